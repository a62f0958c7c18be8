"""Character tokenizer, T5 relative position bias, and the transcription encoder."""

import pytest
import torch

from textdiff.models.text_encoder import (END_ID, MASK_ID, PAD_ID, START_ID, UNKNOWN_ID, CharTokenizer, ScaleNorm,
                                          T5RelativePositionBias, TextEncoder, max_characters,
                                          relative_position_bucket)


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


def test_null_transcription_is_four_mask_tokens_and_differs_from_the_empty_string():
    """The research code drops a transcription to "<mask><mask><mask><mask>"; "" is just START, END."""
    tok = CharTokenizer(max_seq_len=8)
    ids, mask = tok.encode([None, ""])
    assert ids[0].tolist() == [START_ID, MASK_ID, MASK_ID, MASK_ID, MASK_ID, END_ID, PAD_ID, PAD_ID]
    assert ids[1].tolist() == [START_ID, END_ID] + [PAD_ID] * 6
    assert mask.sum(dim=1).tolist() == [6, 2]


def test_printable_vocabulary_is_the_research_codes_105_tokens():
    """5 special tokens (<s> 0, </s> 1, <unk> 2, <pad> 3, <mask> 4) + the 100 characters of string.printable."""
    tok = CharTokenizer(max_seq_len=8)
    assert tok.vocab_size == 105 and (START_ID, END_ID, UNKNOWN_ID, PAD_ID, MASK_ID) == (0, 1, 2, 3, 4)
    assert tok.ids("a\tb\n") == [START_ID, tok.char_to_id["a"], tok.char_to_id["\t"], tok.char_to_id["b"],
                                  tok.newline_id, END_ID]
    assert tok.ids("\u00e9") == [START_ID, UNKNOWN_ID, END_ID]  # not printable ASCII
    assert CharTokenizer(max_seq_len=8, vocabulary="textdiff").vocab_size == 5 + 202


def test_unknown_characters_map_to_the_reserved_id_without_crashing():
    tok = CharTokenizer(max_seq_len=8)
    ids, _ = tok.encode(["a\u2603b\U0001F600\u4e2d"])  # snowman, emoji, CJK
    a, b = tok.char_to_id["a"], tok.char_to_id["b"]
    assert ids[0, :7].tolist() == [START_ID, a, UNKNOWN_ID, b, UNKNOWN_ID, UNKNOWN_ID, END_ID]


def test_decomposed_accents_are_normalised_to_one_known_character():
    tok = CharTokenizer(max_seq_len=4, vocabulary="textdiff")
    assert tok.ids("e\u0301") == [START_ID, tok.char_to_id["\u00e9"], END_ID]


def test_max_seq_len_counts_the_start_and_end_tokens():
    """max_seq_len 4 holds 2 characters; a longer string keeps its first 2 and its END, with a warning."""
    tok = CharTokenizer(max_seq_len=4)
    assert max_characters(4) == 2
    with pytest.warns(UserWarning, match="2 transcription"):
        ids, mask = tok.encode(["abcdef", "ab", "xyz"])  # 8, 4 and 5 tokens
    assert ids[0].tolist() == [START_ID, tok.char_to_id["a"], tok.char_to_id["b"], END_ID]
    assert ids.shape == (3, 4) and tok.num_truncated == 2 and mask.all()
    with pytest.warns(UserWarning, match="3 so far"):
        tok.encode(["abc"])
    assert tok.num_truncated == 3


def test_line_embedding_gives_each_line_its_own_vector_and_counts_newlines_inclusively():
    """Same characters, same positions: only the line index differs, so only the features after a newline move.

    The research code's line index is cumsum(token == newline): the newline itself already belongs to line 1.
    """
    torch.manual_seed(0)
    tok = CharTokenizer(max_seq_len=8)
    enc = TextEncoder(tok.vocab_size, max_seq_len=8, dim=32, depth=0, ff_mult=2, ff_glu=False, rezero=False,
                      t5=False, newline_id=tok.newline_id)
    ids = torch.tensor([tok.ids("ab\ncd"), tok.ids("ab\ncd")])  # 7 tokens
    ids[1, 3] = tok.char_to_id[" "]  # the same string on one line
    lines = (ids == tok.newline_id).cumsum(1)
    assert lines[0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    with torch.no_grad():
        out = enc(ids, torch.ones_like(ids, dtype=torch.bool))
        line_vec = enc.line_emb.emb.weight * 32 ** -0.5
    assert torch.equal(out[0, :3], out[1, :3])  # line 0 in both
    assert torch.allclose(out[0, 4:] - out[1, 4:], (line_vec[1] - line_vec[0]).expand(3, 32), atol=1e-6)
    assert sum(p.numel() for p in enc.line_emb.parameters()) == 32 * 32  # 32 lines


def test_lines_past_the_32nd_share_the_last_row():
    tok = CharTokenizer(max_seq_len=80)
    enc = TextEncoder(tok.vocab_size, max_seq_len=80, dim=8, depth=0, ff_mult=2, ff_glu=False, rezero=False,
                      t5=False, newline_id=tok.newline_id)
    ids = torch.tensor([tok.ids("\n" * 40)])
    with torch.no_grad():
        le = enc.line_emb(ids)
    assert torch.equal(le[0, 32], le[0, 40]) and not torch.equal(le[0, 30], le[0, 31])


def test_scale_norm_gives_every_token_rms_g_and_has_one_parameter():
    """x / (|x| / sqrt(dim)) has root-mean-square 1 whatever the input's scale; g scales it."""
    norm = ScaleNorm(64)
    with torch.no_grad():
        norm.g.fill_(2.5)
    x = torch.randn(3, 5, 64) * torch.tensor([0.01, 1.0, 300.0])[:, None, None]
    rms = norm(x).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full((3, 5), 2.5), rtol=1e-5)
    assert sum(p.numel() for p in norm.parameters()) == 1


def test_encoder_uses_scale_norm_without_rezero_and_ends_without_a_final_norm():
    enc = TextEncoder(vocab_size=50, max_seq_len=8, dim=64, depth=2, ff_mult=2, ff_glu=False, rezero=False, t5=True)
    assert sum(isinstance(m, ScaleNorm) for m in enc.modules()) == 4
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in enc.modules())


def test_t5_bias_is_the_table_times_sqrt_dim_head():
    """dim 512 -> 8 heads of 64: x-transformers adds 8 * table to the already-scaled logits."""
    enc = TextEncoder(vocab_size=50, max_seq_len=8, dim=512, depth=0, ff_mult=2, ff_glu=False, rezero=False, t5=True)
    with torch.no_grad():
        bias = enc.rel_bias(3)
        table = enc.rel_bias.table.weight
    assert enc.rel_bias.scale == 8.0
    assert torch.allclose(bias[:, 0, 1], 8.0 * table[relative_position_bucket(torch.tensor(1))], atol=1e-6)


def test_token_embedding_starts_kaiming_normal():
    """std sqrt(2 / dim) = 0.0625 at dim 512; over 105 x 512 = 53,760 draws the sample std is within
    3 * 0.0625 / sqrt(2 * 53,760) = 0.0008 of it."""
    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=105, max_seq_len=8, dim=512, depth=0, ff_mult=2, ff_glu=False, rezero=False, t5=False)
    w = enc.token_emb.weight.detach()
    assert abs(float(w.std()) - 0.0625) < 3 * 0.0625 / (2 * w.numel()) ** 0.5
    assert abs(float(w.mean())) < 3 * 0.0625 / w.numel() ** 0.5


def test_padding_positions_do_not_change_the_encoding_of_real_tokens():
    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=50, max_seq_len=8, dim=32, depth=2, ff_mult=2, ff_glu=False, rezero=False, t5=True)
    ids = torch.tensor([[0, 7, 9, 1, 3, 3, 3, 3]])
    mask = ids != PAD_ID
    other = ids.clone()
    other[0, 4:] = torch.tensor([11, 12, 13, 14])  # garbage where the mask says padding
    out_a, out_b = enc(ids, mask), enc(other, mask)
    assert torch.allclose(out_a[0, :4], out_b[0, :4], atol=1e-6)
    assert not torch.allclose(enc(ids, torch.ones_like(mask))[0, :4], out_a[0, :4], atol=1e-3)


def test_the_timestep_aware_encoder_gives_other_features_at_another_noise_level():
    """The research code adds dim**-0.5 * Linear(SiLU(sinusoid(t))) to every token; without it t is ignored."""
    torch.manual_seed(0)
    ids, mask = torch.tensor([[0, 10, 11, 1]]), torch.ones(1, 4, dtype=torch.bool)
    aware = TextEncoder(vocab_size=50, max_seq_len=8, dim=32, depth=1, ff_mult=2, ff_glu=False, rezero=False,
                        t5=True, timestep_emb=True)
    plain = TextEncoder(vocab_size=50, max_seq_len=8, dim=32, depth=1, ff_mult=2, ff_glu=False, rezero=False,
                        t5=True, timestep_emb=False)
    with torch.no_grad():
        early, late = (aware(ids, mask, torch.tensor([s])) for s in (50.0, 900.0))
        assert float((early - late).abs().max()) > 1e-2
        assert torch.equal(plain(ids, mask, torch.tensor([50.0])), plain(ids, mask, torch.tensor([900.0])))
    assert sum(p.numel() for p in aware.time_proj.parameters()) == 32 * 32 + 32
