"""The options every command that makes variants shares (`quantize`, `audit`, `probe`): the base
model, the calibration data and prompts, Q-realign's probe model and the ablation layer.

Defined once so the three commands spell and document them alike; their values become one
:class:`harness.quantize.VariantSettings` (the audit first merges them into its config file).
"""

from __future__ import annotations

import argparse


def add_variant_args(p: argparse.ArgumentParser) -> None:
    """``--base``, the ``--calib-*`` group, ``--probe-model`` and ``--ablate-layer``. Every
    default is None here (the audit's config file may set them); None means the documented default."""
    from harness.calibration_data import CalibrationOptions

    d = CalibrationOptions()
    p.add_argument("--base",
                   help="unaligned base (PT) model of --model for methods that need one (aaq): a model, 'ablated' (build "
                        "it from --model by refusal-direction ablation) or 'none' (default auto: the bundled model's "
                        "base, e.g. toy-base for the toy models, smol-base for the smol family, none otherwise)")
    g = p.add_argument_group("calibration (methods that need data: gptq, smoothquant, quarot, ost, aaq, qrealign)")
    g.add_argument("--calib-text", metavar="SOURCE",
                   help="calibration text: a UTF-8 file, dataset:ID[:CONFIG]:SPLIT, toy-pretrain, or chat:calibration "
                        "(benign built-in calibration requests in the chat template, answered by the model itself; "
                        "chat:FILE for another prompt file) (default auto: toy-pretrain for bundled toy models, "
                        "WikiText-2 train through datasets otherwise)")
    g.add_argument("--calib-samples", type=int, metavar="N", help=f"calibration sequences (default {d.samples})")
    g.add_argument("--calib-len", type=int, metavar="TOKENS", help=f"tokens per calibration sequence (default {d.length})")
    g.add_argument("--calib-batch", type=int, metavar="N", help=f"sequences per calibration batch (default {d.batch})")
    g.add_argument("--calib-span", metavar="START:END",
                   help="use only this fraction of the calibration text, e.g. 0.4:1 to keep it apart from an "
                        f"evaluation text taken from the same file (default {d.span})")
    g.add_argument("--calib-prompts", metavar="SET",
                   help="labelled harmful/benign prompts for prompt-based calibration (Q-realign, --base ablated): "
                        f"'calibration' (built-in, disjoint from every evaluation set) or a prompt file (default {d.prompts})")
    g.add_argument("--allow-calibration-overlap", dest="allow_overlap", action="store_true", default=None,
                   help="evaluate even when evaluation prompts are also calibration prompts (not recommended)")
    g.add_argument("--probe-model", metavar="M",
                   help="aligned model whose SLR probes Q-realign uses: a model, or 'subject' (default auto: the known "
                        "aligned parent of a bundled model, e.g. toy-chat for toy-chat-eroded, else the subject)")
    g.add_argument("--ablate-layer", type=int, metavar="L",
                   help="with --base ablated: take the refusal direction at this decoder layer "
                        "(default: the layer whose ablation removes the most refusal)")


def calibration_options(args: argparse.Namespace):
    """:class:`~harness.calibration_data.CalibrationOptions` from the parsed ``--calib-*`` flags."""
    from harness.calibration_data import CalibrationOptions
    from harness.errors import UserError

    calib = CalibrationOptions.from_keys(vars(args))
    for name, value in (("--calib-samples", calib.samples), ("--calib-len", calib.length), ("--calib-batch", calib.batch)):
        if value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}")
    return calib


def variant_settings(args: argparse.Namespace, *, system_prompt: str | None = None):
    """:class:`harness.quantize.VariantSettings` of a command that takes its options from flags only
    (`quantize`, `probe`); ``args`` also carries ``--seed``, ``--device``, ``--dtype`` and
    ``--trust-remote-code``."""
    from harness.quantize import VariantSettings

    return VariantSettings(base=args.base or "auto", calibration=calibration_options(args),
                           probe_model=args.probe_model or "auto", ablate_layer=args.ablate_layer, seed=args.seed,
                           system_prompt=system_prompt, device=args.device, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code)
