"""`safequant list`: what this installation can do: quantizers, prompt sets, models, judges, texts."""

from __future__ import annotations

import argparse

def cmd_list(args: argparse.Namespace) -> int:
    from harness.judges import judge_registry
    from harness.models import PACKAGED_GGUF, SMOL_FAMILY, SMOL_FAMILY_DIR, TOY_MODEL_NAMES, TOY_MODELS_DIR
    from harness.perplexity import BUILTIN_TEXTS
    from harness.prompts import list_prompt_sets
    from quantizers.base import quantizer_descriptions

    print("quantizers:")
    for name, description in quantizer_descriptions().items():
        print(f"  {name:<14} {description}")
    print("prompt sets:")
    for name, role, n, description in list_prompt_sets():
        print(f"  {name:<14} {role:<12} {n:>4} prompts  {description}")
    print("models:")
    for name in TOY_MODEL_NAMES:
        state = "bundled" if (TOY_MODELS_DIR / name / "config.json").is_file() else "missing (run scripts/build_toy_models.py)"
        print(f"  {name:<24} {state}")
    for name, adapters in SMOL_FAMILY.items():
        missing = [a for a in adapters if not (SMOL_FAMILY_DIR / a / "adapter_model.safetensors").is_file()]
        state = ("missing (run scripts/build_smol_family.py)" if missing
                 else "SmolLM2-135M-Instruct GGUF" + (f" + LoRA {' + '.join(adapters)}" if adapters else " as shipped"))
        print(f"  {name:<24} {state}")
    for name, (package, _) in PACKAGED_GGUF.items():
        print(f"  {name:<24} GGUF from the PyPI package {package.replace('_', '-')}")
    print("judges:")
    for name in judge_registry():
        print(f"  {name}")
    print("perplexity texts:")
    for name, path in BUILTIN_TEXTS.items():
        print(f"  {name:<14} {path.name}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("list", help="list quantizers, prompt sets, bundled models, judges and texts")
    p.set_defaults(func=cmd_list)
