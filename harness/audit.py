"""One audit: quantize every variant, generate on every prompt set, judge, measure perplexity.

Order of work (and why):
1. Validate every input (variants, prompt sets, models, texts, calibration sources, output dir)
   before anything is loaded or written, so bad input never leaves a half-made run directory;
   what needs the model (prompt lengths against its context, --calib-len, --probe-layers) right
   after it loads, still before the run directory is made and locked for the rest of the run.
2. Load the subject model once; each variant quantizes its own copy, so FP stays the reference.
3. Per variant (made by the variant maker, harness/quantize.py), per prompt set: reuse cached
   rows, generate only the missing prompts, append rows per batch (resume point), then perplexity
   (cached too), then a cheap record of the variants so far (summary.json without statistics,
   rows.jsonl, both atomic).
4. Once at the end: the statistics, the probe figures and the report, so their cost does not
   grow with the square of the number of variants.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import harness
from harness import quantize as variant_maker
from harness.backends import (VLLMSettings, backend_key, check_backends, check_built, dtype_name,
                              parse_backends)
from harness.coherence import response_logprobs
from harness.config import AuditConfig, VariantSpec
from harness.errors import UserError
from harness.generation import Backend, GenerationSettings, HFBackend, chat_prompt
from harness.benchmarks import WIKITEXT2_TEST, describe_sets, find_data_file, load_benchmarks
from harness.judges.validation import load_error_profiles
from harness.judges import get_judges, judge_all
from harness.models import (SMOL_FAMILY, LoadedModel, ModelSource, fingerprint_model, load_model, resolve_model,
                            tokenizer_fingerprint)
from harness.perplexity import PerplexitySettings, load_text, perplexity
from harness.prompts import PromptSet
from harness.stats import (annotate_flips, default_pairs, first_token_summary, incoherent_by_set, label_counts,
                           pairwise_block, summary_block)
from harness.store import SCHEMA_VERSION, RunStore, check_writable, stable_hash
from probes.capture import count_layers, parse_layers
from probes.errors import ProbeError
from probes.slr import check_classes
from probes.suite import ProbeSuite

log = logging.getLogger(__name__)

#: Below this many new tokens a refusal is often cut before it is stated ("I'm sorry, but I can't
#: help with that." is 12 tokens for SmolLM2's tokenizer), so refusal rates are unreliable.
MIN_JUDGED_TOKENS = 16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ppl_settings(config: AuditConfig, source: ModelSource) -> PerplexitySettings:
    text = config.perplexity_text
    if text == "auto":
        wikitext = find_data_file(WIKITEXT2_TEST, config.data_dir) if source.spec in SMOL_FAMILY else None
        if source.kind == "toy":
            text = "toy-heldout"
        elif wikitext is not None:
            text = str(wikitext)  # the smol family: WikiText-2 test from the benchmark data folder
        else:
            where = f", or --data-dir DIR holding {WIKITEXT2_TEST}" if source.spec in SMOL_FAMILY else ""
            raise UserError(
                f"no perplexity text for model {source.spec!r}: pass --perplexity-text PATH "
                f"(e.g. WikiText-2 test as a .txt/.raw file){where}"
            )
    return PerplexitySettings(source=text, window=config.ppl_window, stride=config.ppl_stride,
                              max_tokens=config.ppl_max_tokens, batch_size=max(1, config.batch_size // 4))


class Audit:
    """Holds the validated inputs of one audit and runs it."""

    def __init__(self, config: AuditConfig):
        config.validate()
        self.variants: list[VariantSpec] = config.variant_specs()
        self.pairs = config.variant_pairs(self.variants)
        self.prompt_sets: list[PromptSet] = load_benchmarks(config.prompt_sets, data_dir=config.data_dir, limit=config.limit)
        self.subject_source = resolve_model(config.model)
        self.maker = variant_maker.check(
            self.variants, self.subject_source,
            variant_maker.VariantSettings(
                base=config.base, calibration=config.calibration, probe_model=config.probe_model,
                ablate_layer=config.ablate_layer, seed=config.seed, system_prompt=config.system_prompt,
                device=config.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                cache_dir=config.cache_path()),
            evaluation=[(ps.name, r.id, r.prompt) for ps in self.prompt_sets for r in ps.records])
        self.config = config = dataclasses.replace(config, base=self.maker.base)  # "auto" as the model it names
        self.base_source = self.maker.base_source  # the base model the summary names (None: none or ablated)
        self.backends = parse_backends(config.backend, self.variants)
        self.vllm = VLLMSettings(config.tensor_parallel_size, config.pipeline_parallel_size,
                                 config.gpu_memory_utilization)
        self.vllm.check()
        check_backends(self.backends, self.variants, self.maker.saved_infos)
        self.ppl = _ppl_settings(config, self.subject_source)
        self.ppl_text = load_text(self.ppl.source)
        self.judges = get_judges(config.judges)
        self.judge = self.judges[0]  # the primary judge: its labels are the rates in every table
        self.gen = GenerationSettings(config.max_new_tokens, config.batch_size, config.system_prompt)
        if config.max_new_tokens < MIN_JUDGED_TOKENS:
            log.warning("--max-new-tokens %d is below the %d tokens the judges need to see a refusal: responses are "
                        "cut before it is stated and refusal rates are unreliable", config.max_new_tokens,
                        MIN_JUDGED_TOKENS)
        self.run_dir = Path(config.out)
        check_writable(self.run_dir)
        self.store = RunStore(self.run_dir, config.cache_path())
        # Set by run(): the FP model that scores every variant's responses (incoherence), and the
        # probe suite (None when skipped, with the reason).
        self.fp_model: torch.nn.Module | None = None
        self.probes: ProbeSuite | None = None
        self.probe_skip_reason: str | None = None

    def _check_loaded(self, subject: LoadedModel) -> None:
        """The checks that need the model (its context, its depth), before any run directory is made."""
        self.maker.check_loaded(subject)
        limit = getattr(subject.model.config, "max_position_embeddings", None)
        for ps in self.prompt_sets:
            for r in ps.records:
                n = len(subject.tokenizer(chat_prompt(subject.tokenizer, r.prompt, self.gen.system_prompt),
                                          add_special_tokens=False, verbose=False)["input_ids"])
                if isinstance(limit, int) and n + self.gen.max_new_tokens > limit:
                    raise UserError(f"prompt {ps.name}/{r.id} is {n} tokens: with --max-new-tokens "
                                    f"{self.gen.max_new_tokens} it does not fit the model's {limit}-token context; "
                                    "shorten it, remove it from the set, or lower --max-new-tokens")
        depth = count_layers(subject.model)
        if self.config.probes and depth:
            try:
                parse_layers(self.config.probe_layers, depth)
            except ProbeError as exc:
                raise UserError(f"--probe-layers {self.config.probe_layers!r}: {exc}") from None

    def run(self, command: str = "") -> dict:
        seed_everything(self.config.seed)
        log.info("loading %s", self.subject_source.spec)
        subject = load_model(self.subject_source, self.config.device, self.config.dtype, self.config.trust_remote_code)
        self._check_loaded(subject)
        self.maker.prepare(subject)  # the base and probe models the variants need, once (checked: nothing written yet)
        self.fp_model = subject.model
        with self.store.locked():  # one audit per run directory; a second fails at once
            return self._run(subject, command)

    def _run(self, subject: LoadedModel, command: str) -> dict:
        started = time.perf_counter()
        summary = self._summary_header(subject, command)
        self.probes = self._probe_suite(subject)
        if self.probes is None and self.config.probes:
            summary["probes"] = {"skipped": self.probe_skip_reason}
        all_rows: list[dict] = []
        reference = self.variants[0].name
        judge_names = [j.name for j in self.judges]
        for spec in self.variants:
            record, rows = self._run_variant(spec, subject)
            summary["variants"].append(record)
            all_rows.extend(rows)
            self._finish_metrics(summary)
            summary["wall_seconds"] = round(time.perf_counter() - started, 2)
            # A cheap record after every variant but the last (the gate refuses it as partial); the
            # statistics, figures and report are made once, below, so their cost does not grow
            # with the square of the number of variants.
            if spec is not self.variants[-1]:
                self.store.write_results(summary, annotate_flips(all_rows, reference=reference, judges=judge_names))
        summary["statistics"] = summary_block(all_rows, reference=reference, judges=judge_names,
                                              n_boot=self.config.bootstrap, seed=self.config.seed,
                                              judge_errors=load_error_profiles())
        for record in summary["variants"]:  # needs FP's rows for the threshold, so set here
            record["metrics"]["incoherent"] = incoherent_by_set(summary["statistics"], record["name"], self.judge.name)
        for entry in summary["judges"]:  # the documented judges[].counts, over every row of the run
            entry["counts"] = label_counts(all_rows, entry["name"])
        summary["statistics"]["pairs"] = self._pair_statistics(all_rows, summary["variants"],
                                                               summary["statistics"]["coherence"]["threshold"])
        if self.config.first_token:
            summary["first_token"] = first_token_summary(all_rows, self.judge.name)
        if self.probes is not None:
            summary["probes"] = self.probes.finish()
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        self.store.write_results(summary, annotate_flips(all_rows, reference=reference, judges=judge_names))
        self._render()
        return summary

    def _pair_statistics(self, rows: list[dict], done: list[dict], threshold: float | None) -> list[dict]:
        """Head-to-head statistics: the user's ``--pairs`` first, then the default pairs (each
        calibration method against its counterpart), over the variants evaluated so far."""
        finished = {v["name"] for v in done}
        user = [p for p in self.pairs if set(p) <= finished]
        default = [p for p in default_pairs(done) if p not in user]
        settings = {"judge": self.judge.name, "n_boot": self.config.bootstrap, "seed": self.config.seed,
                    "threshold": threshold}
        return (pairwise_block(rows, user, origin="user", **settings)
                + pairwise_block(rows, default, origin="default", **settings))

    # -- one variant ----------------------------------------------------------------------------
    def _run_variant(self, spec: VariantSpec, subject: LoadedModel):
        log.info("variant %s: %s (%s, %s)", spec.name, "loading" if spec.artifact else "quantizing",
                 spec.method, spec.scheme.label)
        seed_everything(self.config.seed)
        variant = self.maker.make(spec, subject)
        model = variant.model
        quantize_seconds = variant.seconds
        if self.probes is not None:
            self.probes.add(spec.name, model)  # fp comes first: its probes are the reference
        fingerprint = subject.fingerprint if spec.method == "fp" else fingerprint_model(model, subject.tokenizer)
        # Everything that decides a row besides its prompt (whose text hash each row carries). Not
        # the variant's name: it labels results, so the shared cache serves a renamed variant too.
        key = {"model": subject.fingerprint, "tokenizer": tokenizer_fingerprint(subject.tokenizer),
               "variant": {k: v for k, v in spec.describe().items() if k != "name"},
               "variant_fingerprint": fingerprint,
               "generation": {**self.gen.key(), **backend_key(self.backends[spec.name], model)},
               "judges": [j.describe() for j in self.judges], "first_token": self.config.first_token,
               "seed": self.config.seed, "coherence": "fp_logprob"}
        work = self.store.variant_work(spec.name, key)

        t1 = time.perf_counter()
        rows: list[dict] = []
        counts: dict[str, dict] = {}
        engine = _LazyBackend(lambda: self._open_backend(spec, variant, subject))
        try:
            for ps in self.prompt_sets:
                set_rows = self._generate_set(engine, subject.tokenizer, spec, ps, work)
                rows.extend(set_rows)
                counts[ps.name] = _count(set_rows)
        finally:
            engine.close()
        ppl = work.get("perplexity")
        settings = {**self.ppl.key(), "text_sha256": hashlib.sha256(self.ppl_text.encode("utf-8")).hexdigest()}
        if not isinstance(ppl, dict) or ppl.get("settings") != settings or not isinstance(ppl.get("perplexity"), (int, float)):
            ppl = perplexity(model, subject.tokenizer, self.ppl_text, self.ppl)
            ppl["settings"] = settings
            work.put("perplexity", ppl)
        record = {
            **spec.describe(),
            "quantizer": variant.record,
            "backend": engine.described or {"name": self.backends[spec.name],
                                            "started": False, "why": "every response was reused from the cache"},
            "fingerprint": fingerprint,
            "quantize_seconds": round(quantize_seconds, 3),
            "eval_seconds": round(time.perf_counter() - t1, 3),
            "status": "done",
            "metrics": {
                "refusal": {name: c["refusal"] / c["n"] for name, c in counts.items()},
                "empty": {name: c["empty"] / c["n"] for name, c in counts.items()},
                "degenerate": {name: c["degenerate"] / c["n"] for name, c in counts.items()},
                "perplexity": ppl["perplexity"],
            },
            "counts": counts,
        }
        log.info("variant %s: %s, perplexity %.3f", spec.name,
                 ", ".join(f"refusal[{k}]={v:.2f}" for k, v in record["metrics"]["refusal"].items()), ppl["perplexity"])
        if model is not subject.model:
            del model
        return record, rows

    def _open_backend(self, spec: VariantSpec, variant, subject: LoadedModel) -> Backend:
        """The generation backend of one variant: transformers on its torch model, or a vLLM engine
        on its weights (started only when some prompt is not cached)."""
        if self.backends[spec.name] == "hf":
            return HFBackend(variant.model)
        from harness.vllm_backend import VLLMBackend

        check_built(spec, variant.model)
        return VLLMBackend.for_variant(variant.model, spec.artifact, spec.method, subject,
                                       dtype=dtype_name(variant.model), seed=self.config.seed, settings=self.vllm,
                                       trust_remote_code=self.config.trust_remote_code)

    def _generate_set(self, engine: _LazyBackend, tokenizer, spec: VariantSpec, ps: PromptSet, work) -> list[dict]:
        inputs = {rec.id: input_sha(rec) for rec in ps.records}
        # A cached row counts only for the same prompt text: an edited prompt is generated again.
        done = {r["id"]: r for r in work.rows(ps.name) if r.get("input_sha") == inputs.get(r["id"])}
        todo = [rec for rec in ps.records if rec.id not in done]
        shared = work.shared_rows() if todo else {}
        reused = [_relabel(shared[inputs[rec.id]], spec.name, ps, rec) for rec in todo if inputs[rec.id] in shared]
        if reused:
            log.info("variant %s: %d prompts of %s reused from the cache", spec.name, len(reused), ps.name)
            work.append_rows(ps.name, reused, share=False)
            done.update({r["id"]: r for r in reused})
            todo = [rec for rec in todo if rec.id not in done]
        if todo:
            log.info("variant %s: %d/%d prompts of %s to generate", spec.name, len(todo), len(ps.records), ps.name)

            def save(start: int, responses: list[str], hit_max: list[bool]) -> None:
                batch = todo[start : start + len(responses)]
                metas = [{"behavior": getattr(r, "behavior", "") or r.prompt, "context": getattr(r, "context", ""),
                          "hit_max_tokens": cut} for r, cut in zip(batch, hit_max, strict=True)]
                verdicts = judge_all(self.judges, [r.prompt for r in batch], responses, metas)
                # the FP model's log-likelihood of the response: the incoherence signal (harness/coherence.py)
                fp_logprobs = response_logprobs(self.fp_model, tokenizer, [r.prompt for r in batch], responses,
                                                system_prompt=self.gen.system_prompt, batch_size=self.gen.batch_size)
                rows = [_row(spec.name, ps, r, resp, cut, per, self.judge.name, first_token.get(r.id))
                        for r, resp, cut, per in zip(batch, responses, hit_max, verdicts, strict=True)]
                for row, lp in zip(rows, fp_logprobs, strict=True):
                    row["fp_logprob"] = lp
                work.append_rows(ps.name, rows)

            first_token: dict[str, float] = {}
            if self.config.first_token:
                # on the variant's backend: vLLM scores the runtime's first token, hf the torch model's
                probs = engine.get().first_token_refusal_prob(tokenizer, [r.prompt for r in todo], self.gen)
                first_token = {r.id: p for r, p in zip(todo, probs, strict=True)}
            engine.get().generate(tokenizer, [r.prompt for r in todo], self.gen, on_batch=save)
            done.update({r["id"]: r for r in work.rows(ps.name) if r.get("input_sha") == inputs.get(r["id"])})
        return [done[rec.id] for rec in ps.records]

    # -- probes ---------------------------------------------------------------------------------
    def _probe_suite(self, subject: LoadedModel):
        """Per-layer SLR probes on the harmful and benign prompts of this audit, or None.

        Probes are skipped (with the reason in the summary) rather than failing the audit when
        the sets are too small for a train/test split, e.g. with --limit.
        """
        self.probe_skip_reason = "disabled (--no-probes)"
        if not self.config.probes:
            return None
        pairs = [(ps, r) for ps in self.prompt_sets if ps.role in ("harmful", "benign")
                 for r in ps.records if r.label == ps.role]
        labels = np.array([1 if r.label == "harmful" else 0 for _, r in pairs])
        try:
            check_classes(labels, what="the audit's harmful and benign prompts")
        except ProbeError as exc:
            self.probe_skip_reason = str(exc)
            log.warning("probes skipped: %s", exc)
            return None
        prompts = [chat_prompt(subject.tokenizer, r.prompt, self.config.system_prompt) for _, r in pairs]
        return ProbeSuite(subject.tokenizer, prompts, [r.label for _, r in pairs], self.run_dir,
                          ids=[f"{ps.name}/{r.id}" for ps, r in pairs], layers=self.config.probe_layers,
                          seed=self.config.seed, batch_size=self.config.batch_size)

    # -- summary --------------------------------------------------------------------------------
    def _summary_header(self, subject: LoadedModel, command: str) -> dict:
        import transformers

        return {
            "schema_version": SCHEMA_VERSION,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "safequant_version": harness.__version__,
            "command": command,
            "config": self.config.settings(),
            "models": {"subject": subject.describe(),
                       "base": ({"name": self.base_source.name, "spec": self.base_source.spec} if self.base_source
                                else {"name": self.config.base, "spec": self.config.base} if self.config.base else None)},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "platform": platform.platform(),
                            "device": str(next(subject.model.parameters()).device), "threads": torch.get_num_threads(),
                            "argv": sys.argv},
            "prompt_sets": describe_sets(self.prompt_sets),
            "judges": [{**j.describe(), "primary": j is self.judge, "error": load_error_profiles().get(j.name)}
                       for j in self.judges],
            "perplexity": {**self.ppl.key()},
            "variants": [],
            "wall_seconds": None,
        }

    @staticmethod
    def _finish_metrics(summary: dict) -> None:
        reference = summary["variants"][0]["metrics"]["perplexity"]
        for variant in summary["variants"]:
            variant["metrics"]["perplexity_ratio"] = variant["metrics"]["perplexity"] / reference

    def _render(self) -> None:
        if not self.config.report:
            return
        from reports import render

        render(self.run_dir)


class _LazyBackend:
    """A variant's generation backend, opened on first use (a vLLM engine costs seconds to minutes
    to start, wasted when every row comes from the cache) and closed once."""

    def __init__(self, open_backend) -> None:
        self._open, self._backend = open_backend, None
        self.described: dict | None = None

    def get(self) -> Backend:
        if self._backend is None:
            self._backend = self._open()
            self.described = self._backend.describe()
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def input_sha(record) -> str:
    """Hash of what decides a row besides the model and settings: the prompt and what the judges read."""
    return stable_hash({"prompt": record.prompt, "behavior": getattr(record, "behavior", "") or "",
                        "context": getattr(record, "context", "") or ""})


def _relabel(row: dict, variant: str, ps: PromptSet, record) -> dict:
    """A cached row (perhaps from another run directory) under this run's labels for its prompt."""
    return {**row, "variant": variant, "set": ps.name, "benchmark": getattr(ps, "benchmark", ps.name),
            "id": record.id, "category": record.category, "label": record.label}


def _count(rows: list[dict]) -> dict:
    """Primary-judge label counts; empty and degenerate responses are never counted as refusals."""
    counts = {"n": len(rows), "refusal": 0, "compliance": 0, "empty": 0, "degenerate": 0}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    return counts


def _row(variant: str, ps: PromptSet, record, response: str, hit_max: bool, verdicts: dict, primary: str,
         first_token: float | None) -> dict:
    """One per-prompt result row (keys documented in docs/architecture.md)."""
    main = verdicts[primary]
    return {"variant": variant, "set": ps.name, "benchmark": getattr(ps, "benchmark", ps.name), "id": record.id,
            "category": record.category, "label": record.label, "prompt": record.prompt, "response": response,
            "hit_max_tokens": hit_max, "judge": primary, "verdict": main["label"], "score": main["score"],
            "matched": main["matched"], "flags": main["flags"], "judges": verdicts,
            "first_token_refusal_prob": first_token, "input_sha": input_sha(record)}
