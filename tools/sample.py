#!/usr/bin/env python
"""Sample images from a trained textdiff model, optionally through upsampler stages (see docs/sampling.md).

    python tools/sample.py --run-dir runs/demo --txt hello --txt "" --count 4 --out samples/demo
    python tools/sample.py --weights base.safetensors --prompts prompts.jsonl --upsampler up.safetensors \\
        --noise-cond-level 100 --out samples/cascade
    python tools/sample.py --from-jsonl samples/demo/samples.jsonl --index 3 --out samples/again

Writes OUT/samples/NNNNNN.png, OUT/grid.png and OUT/samples.jsonl (every setting of every sample).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from textdiff.config import ConfigError
from textdiff.formats.weights import LoadError
from textdiff.sampling.prompts import Prompt, PromptFileError, read_prompts
from textdiff.sampling.cascade import PRECISIONS, CascadeError, StageSettings
from textdiff.sampling.job import StageSpec, check_job, expand_prompts, replay, run_job
from textdiff.sampling.samplers import SAMPLERS, default_grid, default_sampler

# per-upsampler flags: given once (all upsamplers) or once per --upsampler, in order
UP_FLAGS = {"up_sampler": "sampler", "up_steps": "steps", "up_eta": "eta", "up_guidance_txt": "guidance_txt",
            "up_guidance_capt": "guidance_capt", "up_dynamic_threshold": "dynamic_threshold",
            "noise_cond_level": "noise_cond_level", "up_guidance_after_step": "guidance_after_step"}


def build_parser() -> argparse.ArgumentParser:
    """The flags of tools/sample.py."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--run-dir", help="training run directory (its latest checkpoint) or a checkpoint directory")
    src.add_argument("--weights", help="exported model file (*.safetensors, from tools/export.py)")
    which = src.add_mutually_exclusive_group()
    which.add_argument("--ema", dest="raw", action="store_false", default=False,
                       help="use the EMA weights of checkpoints (default)")
    which.add_argument("--raw", dest="raw", action="store_true", help="use the optimizer's weights of checkpoints")
    src.add_argument("--ema-rate", type=float, help="which EMA, when the run kept several (ema.rates)")

    pr = p.add_argument_group("prompts")
    pr.add_argument("--txt", action="append", default=[], help="a transcription (repeatable; \"\" = no text)")
    pr.add_argument("--null-txt", action="store_true",
                    help="also sample the null transcription: the dropped condition of classifier-free guidance "
                         "(the model's unconditional image); a prompt file says it with \"txt\": null")
    pr.add_argument("--capt", action="append", default=[],
                    help="a caption: once for every --txt, or once per --txt in order (\"\" = none)")
    pr.add_argument("--prompts", help="JSONL file of {\"txt\", \"capt\", \"seed\", \"count\"} (instead of --txt)")
    pr.add_argument("--seed", type=int, default=0, help="seed of --txt prompts; image j of a prompt uses seed + j")
    pr.add_argument("--count", type=int, default=1, help="images per --txt prompt")

    st = p.add_argument_group("sampling (base model)")
    st.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default: the one chosen for the step count, "
                    "DEFAULT_SAMPLING in textdiff/sampling/samplers.py, docs/samplers.md)")
    st.add_argument("--steps", default="50", help="step count (\"50\": the sampler's grid for it, e.g. pow1.5_50), "
                    "a named grid (\"quad50\", \"pow1.5_50\", \"trailing50\", \"karras50\", \"logsnr50\", \"leading50\") "
                    "or a respacing spec (\"ddim50\", \"10,10,10\")")
    st.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    st.add_argument("--guidance-txt", type=float, default=1.0, help="guidance scale of the transcription (1: off)")
    st.add_argument("--guidance-capt", type=float, default=1.0, help="guidance scale of the caption (1: off)")
    st.add_argument("--guidance-after-step", type=float, metavar="STEP",
                    help="guide only at steps below STEP of the training process (the research code's "
                         "guidance_after_step; default: every step)")
    st.add_argument("--dynamic-threshold", type=float, metavar="P",
                    help="dynamic thresholding: quantile of |x0| per sample, e.g. 0.995 (off by default)")
    st.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false",
                    help="do not clip the x0 prediction to [-1, 1] at each step (every stage; clipped by default)")

    up = p.add_argument_group("upsampler stages (each flag once for all, or once per --upsampler)")
    up.add_argument("--upsampler", action="append", default=[], metavar="RUN_OR_FILE",
                    help="an upsampler run directory, checkpoint or *.safetensors (repeatable, in cascade order)")
    up.add_argument("--up-sampler", action="append", help="sampler of the upsampler stages (default: --sampler)")
    up.add_argument("--up-steps", action="append", help="steps of the upsampler stages (default: --steps)")
    up.add_argument("--up-eta", action="append", type=float, help="DDIM eta of the upsampler stages")
    up.add_argument("--up-guidance-txt", action="append", type=float, help="transcription guidance (default 1)")
    up.add_argument("--up-guidance-capt", action="append", type=float, help="caption guidance (default 1)")
    up.add_argument("--up-dynamic-threshold", action="append", type=float, help="thresholding percentile")
    up.add_argument("--up-guidance-after-step", action="append", type=float, metavar="STEP",
                    help="guide the upsampler stages only below STEP (default: every step)")
    up.add_argument("--noise-cond-level", action="append", type=int,
                    help="noise level of the low-res image for noise-conditioned upsamplers (0..999; default 0)")
    up.add_argument("--save-intermediate", action="store_true", help="also save every earlier stage's images")

    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--batch-size", type=int, default=8, help="samples per batch (results do not depend on it)")
    run.add_argument("--device", help="cuda, cuda:N or cpu (default: cpu; with --from-jsonl the record's device)")
    run.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast dtype")
    run.add_argument("--from-jsonl", help="regenerate one sample of this samples.jsonl (with --index)")
    run.add_argument("--index", type=int, help="which sample of --from-jsonl to regenerate")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# what --from-jsonl takes besides itself; every other flag is a setting its record already holds
REPLAY_FLAGS = {"from_jsonl", "index", "out", "device", "quiet"}


def given_flags(argv: Sequence[str]) -> dict[str, str]:
    """{dest: flag name} of the flags written in ``argv``, whatever their values (a default given explicitly
    counts too); flags sharing a dest are named together (``--ema/--raw``)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return {dest: "/".join(o for a in p._actions if a.dest == dest for o in a.option_strings if o.startswith("--"))
            for dest in vars(p.parse_args(argv))}


def cli_prompts(args: argparse.Namespace) -> list[Prompt]:
    """Prompts from --prompts, or from --txt/--capt/--seed/--count."""
    if args.prompts:
        if args.txt or args.capt or args.null_txt:
            raise CascadeError("give prompts either with --prompts FILE or with --txt/--capt/--null-txt, not both")
        return read_prompts(args.prompts)
    if not args.txt and not args.null_txt:
        raise CascadeError("no prompts: give --txt (repeatable; --txt \"\" for an image without text), --null-txt "
                           "or --prompts")
    if args.count < 1:
        raise CascadeError(f"--count {args.count} must be at least 1")
    txts = list(args.txt) + ([None] if args.null_txt else [])
    capts = args.capt or [""]
    if len(capts) == 1:
        capts = capts * len(txts)
    if len(capts) != len(txts):
        raise CascadeError(f"{len(args.capt)} --capt for {len(txts)} --txt/--null-txt; give one caption for all, or "
                           "one per prompt")
    return [Prompt(txt=t, capt=c, seed=args.seed, count=args.count) for t, c in zip(txts, capts)]


def _per_upsampler(args: argparse.Namespace, dest: str, default) -> list:
    values = getattr(args, dest)
    n = len(args.upsampler)
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        flag = "--" + dest.replace("_", "-")
        raise CascadeError(f"{flag} is given {len(values)} times for {n} --upsampler; give it once, or once per "
                           "--upsampler")
    return values


def _default_sampler(flag: str, steps: str) -> str:
    """The sampler chosen for the step count of ``steps`` (given as ``flag``) when none is named."""
    try:
        return default_sampler(steps)
    except ValueError as e:
        raise CascadeError(f"{flag}: {e}") from None


def stage_specs(args: argparse.Namespace) -> tuple[list[StageSpec], list[str]]:
    """The cascade's stages from the flags, and the names that errors call them by."""
    if bool(args.run_dir) == bool(args.weights):
        raise CascadeError("give exactly one of --run-dir RUN_DIR and --weights FILE.safetensors")
    sampler = args.sampler or _default_sampler("--steps", args.steps)
    base = StageSettings(sampler=sampler, steps=default_grid(sampler, args.steps), eta=args.eta,
                         guidance_txt=args.guidance_txt, guidance_capt=args.guidance_capt,
                         dynamic_threshold=args.dynamic_threshold, clip_denoised=args.clip_denoised,
                         guidance_after_step=args.guidance_after_step)
    weights = "raw" if args.raw else "ema"
    source = args.run_dir or args.weights
    specs = [StageSpec(source, base, weights, args.ema_rate)]
    names = [f"--{'run-dir' if args.run_dir else 'weights'} {source}"]
    defaults = {"sampler": args.sampler, "steps": args.steps, "eta": base.eta, "guidance_txt": 1.0,
                "guidance_capt": 1.0, "dynamic_threshold": None, "noise_cond_level": 0,
                "guidance_after_step": None}
    stray = [dest for dest in UP_FLAGS if getattr(args, dest)]
    stray += ["save_intermediate"] if args.save_intermediate else []
    if stray and not args.upsampler:
        raise CascadeError(f"--{stray[0].replace('_', '-')} sets an upsampler stage, but no --upsampler is given")
    columns = {field: _per_upsampler(args, dest, defaults[field]) for dest, field in UP_FLAGS.items()}
    for k, up in enumerate(args.upsampler):
        fields = {field: values[k] for field, values in columns.items()}
        fields["sampler"] = fields["sampler"] or _default_sampler("--up-steps", fields["steps"])
        fields["steps"] = default_grid(fields["sampler"], fields["steps"])  # a plain count: that sampler's grid
        settings = StageSettings(**fields, clip_denoised=args.clip_denoised)
        specs.append(StageSpec(up, settings, weights, args.ema_rate))
        names.append(f"--upsampler {up}")
    return specs, names


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status (2 for bad input, found before any sampling)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.from_jsonl or args.index is not None:
            if not (args.from_jsonl and args.index is not None):
                raise CascadeError("--from-jsonl FILE and --index K go together")
            ignored = [flag for dest, flag in given_flags(argv).items() if dest not in REPLAY_FLAGS]
            if ignored:
                raise CascadeError(f"--from-jsonl regenerates a sample with the model, prompt and settings its record "
                                   f"holds, so {', '.join(ignored)} would be ignored; drop "
                                   f"{'it' if len(ignored) == 1 else 'them'}, or sample afresh without --from-jsonl")
            record = replay(args.from_jsonl, args.index, args.out, device=args.device, progress=not args.quiet)
            print(f"regenerated sample {args.index} -> {args.out}/{record['image']}")
            return 0
        args.device = args.device or "cpu"
        specs, names = stage_specs(args)
        requests = expand_prompts(cli_prompts(args))
        _, warnings = check_job(specs, names, requests, args.device, args.precision)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        records = run_job(specs, requests, args.out, batch_size=args.batch_size, device=args.device,
                          precision=args.precision, save_intermediate=args.save_intermediate,
                          progress=not args.quiet, names=names)
    except (CascadeError, ConfigError, LoadError, PromptFileError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} samples, grid.png and samples.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
