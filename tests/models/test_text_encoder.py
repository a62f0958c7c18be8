"""Character tokenizer, T5 relative position bias, and the transcription encoder."""

import pytest
import torch

from textdiff.models.text_encoder import (NULL_ID, PAD_ID, START_ID, UNKNOWN_ID, CharTokenizer,
                                          T5RelativePositionBias, TextEncoder, relative_position_bucket)


@pytest.mark.parametrize("rel, bucket", [
    (0, 0), (-1, 1), (-7, 7),                       # exact buckets for distances below 8
    (-8, 8), (-12, 9), (-16, 10), (-64, 14),        # 8 + floor(log(d/8) / log(16) * 8)
    (-127, 15), (-128, 15), (-1000, 15),            # max distance 128: the last bucket of the half
    (1, 17), (3, 19), (8, 24), (16, 26), (1000, 31),  # keys after the query use the upper 16 buckets
])
def test_t5_bucket_matches_hand_computed_value(rel, bucket):
    assert relative_position_bucket(torch.tensor([rel])).item() == bucket


def test_t5_buckets_use_31_of_32_values_over_a_long_range():
    # as in T5, distance 0 sits in the lower half, so bucket 16 (upper half, distance 0) is never used
    rel = torch.arange(-300, 301)
    assert sorted(relative_position_bucket(rel).unique().tolist()) == [b for b in range(32) if b != 16]


def test_t5_bias_is_one_table_shared_by_all_layers():
    enc = TextEncoder(vocab_size=50, max_seq_len=16, dim=64, depth=3, ff_mult=2, ff_glu=True, rezero=False, t5=True)
    tables = [m for m in enc.modules() if isinstance(m, T5RelativePositionBias)]
    assert len(tables) == 1 and tables[0].table.weight.shape == (32, 1)
    assert enc.rel_bias(5).shape == (1, 5, 5)


def test_t5_bias_is_toeplitz_in_key_minus_query():
    bias = T5RelativePositionBias(heads=2)(6)
    assert torch.equal(bias[:, 1, 3], bias[:, 2, 4]) and torch.equal(bias[:, 4, 0], bias[:, 5, 1])


def test_null_transcription_differs_from_empty_string():
    tok = CharTokenizer(max_seq_len=4)
    ids, mask = tok.encode([None, ""])
    assert ids[0].tolist() == [NULL_ID, PAD_ID, PAD_ID, PAD_ID]
    assert ids[1].tolist() == [START_ID, PAD_ID, PAD_ID, PAD_ID]
    assert mask.sum(dim=1).tolist() == [1, 1]


def test_unknown_characters_map_to_the_reserved_id_without_crashing():
    tok = CharTokenizer(max_seq_len=8)
    ids, _ = tok.encode(["a\u2603b\U0001F600\u4e2d"])  # snowman, emoji, CJK
    a, b = tok.char_to_id["a"], tok.char_to_id["b"]
    assert ids[0, :6].tolist() == [START_ID, a, UNKNOWN_ID, b, UNKNOWN_ID, UNKNOWN_ID]


def test_decomposed_accents_are_normalised_to_one_known_character():
    tok = CharTokenizer(max_seq_len=4)
    assert tok.ids("e\u0301") == [START_ID, tok.char_to_id["\u00e9"]]


def test_truncation_cuts_to_max_seq_len_and_counts_with_a_warning():
    tok = CharTokenizer(max_seq_len=4)
    with pytest.warns(UserWarning, match="2 transcription"):
        ids, mask = tok.encode(["abcdef", "ab", "xyzw"])  # 7, 3 and 5 tokens
    assert ids.shape == (3, 4) and tok.num_truncated == 2 and mask[0].all()
    with pytest.warns(UserWarning, match="3 so far"):
        tok.encode(["abcd"])
    assert tok.num_truncated == 3


def test_padding_positions_do_not_change_the_encoding_of_real_tokens():
    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=50, max_seq_len=8, dim=32, depth=2, ff_mult=2, ff_glu=False, rezero=False, t5=True)
    ids = torch.tensor([[3, 7, 9, 0, 0, 0, 0, 0]])
    mask = ids != PAD_ID
    other = ids.clone()
    other[0, 3:] = torch.tensor([11, 12, 13, 14, 15])  # garbage where the mask says padding
    out_a, out_b = enc(ids, mask), enc(other, mask)
    assert torch.allclose(out_a[0, :3], out_b[0, :3], atol=1e-6)
    assert not torch.allclose(enc(ids, torch.ones_like(mask))[0, :3], out_a[0, :3], atol=1e-3)


def test_the_timestep_aware_encoder_gives_other_features_at_another_noise_level():
    """The research code adds dim**-0.5 * Linear(SiLU(sinusoid(t))) to every token; without it t is ignored."""
    torch.manual_seed(0)
    ids, mask = torch.tensor([[3, 10, 11, 12]]), torch.ones(1, 4, dtype=torch.bool)
    aware = TextEncoder(vocab_size=50, max_seq_len=8, dim=32, depth=1, ff_mult=2, ff_glu=False, rezero=False,
                        t5=True, timestep_emb=True)
    plain = TextEncoder(vocab_size=50, max_seq_len=8, dim=32, depth=1, ff_mult=2, ff_glu=False, rezero=False,
                        t5=True, timestep_emb=False)
    with torch.no_grad():
        early, late = (aware(ids, mask, torch.tensor([s])) for s in (50.0, 900.0))
        assert float((early - late).abs().max()) > 1e-2
        assert torch.equal(plain(ids, mask, torch.tensor([50.0])), plain(ids, mask, torch.tensor([900.0])))
    assert sum(p.numel() for p in aware.time_proj.parameters()) == 32 * 32 + 32
