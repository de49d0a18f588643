"""Run several policies x retain ratios on the same inputs and tabulate what each costs and says.

    rows = tokcompress.compare(model, inputs, ["uniform", "evs"], retains=[0.5, 0.25], processor=processor)
    pandas.DataFrame(rows)        # one row per (policy, retain, input, batch row)
    rows.plot()                   # TTFT against tokens kept, policy time
    viz.plot_policies(rows.kept(), frames)   # which tokens each run kept on input 0, row 0

TTFT comes from :func:`tokcompress.timing.ttft` (``generate(max_new_tokens=1)``, median of
``repeats`` after ``warmup``); tokens and policy time come from the record of the text generation
that follows, so they describe the same prefill the text came from.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .api import build_policy, is_wrapped, last_record, unwrap, wrap
from .policy import Policy
from .record import RowRecord
from .timing import ttft

__all__ = ["Comparison", "compare"]

PolicyItem = str | Policy | tuple[str, Mapping[str, Any]]


class Comparison(list):
    """The rows of :func:`compare`: a plain ``list`` of ``dict`` (``pandas.DataFrame(rows)`` takes it).

    Row keys: ``run`` (index of the policy x retain run), ``policy`` (registry name), ``label``
    (the policy with its parameters), ``retain`` (requested fraction), ``input`` (index into the
    inputs), ``row`` (batch row), ``tokens_before`` / ``tokens_kept`` (video placeholder tokens of
    the row before / after compression), ``kept_fraction``, ``policy_s`` (seconds inside the policy
    for this row's videos), ``ttft_s`` / ``ttft_p90_s`` (the whole call's TTFT, shared by its rows),
    ``new_tokens`` (generated token count) and ``text`` (decoded answer, ``None`` without a processor).

    Attributes:
        records: ``{(run, input): last_record(model)}`` of each generation, for :mod:`tokcompress.viz`.
    """

    def __init__(self, rows: Sequence[dict[str, Any]] = (), records: dict[tuple[int, int], list[RowRecord]] | None = None):
        super().__init__(rows)
        self.records: dict[tuple[int, int], list[RowRecord]] = records or {}

    def kept(self, input: int = 0, row: int = 0, video: int = 0) -> dict[str, Any]:
        """``{label: KeptTokens}`` of every run on one video, for :func:`tokcompress.viz.plot_policies`."""
        from .viz import kept

        out: dict[str, Any] = {}
        for r in self:
            if r["input"] == input and r["row"] == row and (r["run"], input) in self.records:
                label = r["label"] if r["label"] not in out else f"{r['label']} [run {r['run']}]"
                out[label] = kept(self.records[(r["run"], input)], row=row, video=video, label=label)
        return out

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """TTFT against tokens kept and policy time (:func:`tokcompress.viz.plot_comparison`)."""
        from .viz import plot_comparison

        return plot_comparison(self, path=path)


def _runs(policies: Sequence[PolicyItem], retains: Sequence[float]) -> list[tuple[str, Policy]]:
    """(registry name, policy) for each run, in order: names and (name, params) x retains; objects once."""
    if isinstance(policies, (str, Policy)):
        policies = [policies]
    if not policies:
        raise ValueError("policies is empty: pass names like ['uniform', 'evs'] or Policy objects")
    if not retains:
        raise ValueError("retains is empty: pass fractions like [0.5, 0.25]")
    runs: list[tuple[str, Policy]] = []
    for item in policies:
        if isinstance(item, Policy):
            runs.append((item.name, item))
            continue
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping):
            name, params = item[0], dict(item[1])
        elif isinstance(item, str):
            name, params = item, {}
        else:
            raise TypeError(
                f"each policy must be a name, (name, params dict) or a Policy object; got {type(item).__name__}"
            )
        if "retain" in params:
            raise ValueError(f"policy {name!r}: give retain ratios through retains=, not in its params")
        if name == "none":  # keeps everything whatever retain says: one run
            runs.append((name, build_policy(name, **params)))
            continue
        for retain in retains:
            runs.append((name, build_policy(name, retain, **params)))
    return runs


def _decode(processor: Any, ids: torch.Tensor) -> list[str] | None:
    if processor is None:
        return None
    decode = getattr(processor, "batch_decode", None)
    if decode is None:
        raise TypeError("processor must have batch_decode (a transformers processor or tokenizer)")
    return list(decode(ids, skip_special_tokens=True))


@torch.no_grad()
def compare(
    model: nn.Module,
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    policies: Sequence[PolicyItem],
    retains: Sequence[float] = (0.25,),
    *,
    processor: Any = None,
    max_new_tokens: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = True,
) -> Comparison:
    """Run every policy at every retain ratio on ``inputs`` and return one row per sample.

    Args:
        model: an unwrapped Hugging Face video LLM; each run wraps it and unwraps it afterwards.
        inputs: one processed batch (``processor(...)`` output) or a list of them.
        policies: registered names, ``(name, params)`` pairs, or Policy objects. Names and pairs run
            once per retain ratio; Policy objects (and ``"none"``) run once as they are.
        retains: fractions of visual tokens to keep.
        processor: decodes the generated text (``batch_decode``); ``None`` leaves ``text`` empty.
        max_new_tokens: greedy tokens generated for ``text``.
        repeats, warmup: TTFT timing (see :func:`tokcompress.timing.ttft`).
        progress: show a tqdm bar over runs x inputs.
    """
    if is_wrapped(model):
        raise ValueError("compare wraps the model itself; pass it unwrapped (tokcompress.unwrap(model))")
    batches = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not batches:
        raise ValueError("inputs is empty")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"inputs[{i}] must be a processor output with input_ids; got {type(batch).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    runs = _runs(policies, retains)

    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    records: dict[tuple[int, int], list[RowRecord]] = {}
    bar = tqdm(total=len(runs) * len(batches), desc="compare", disable=not progress)
    try:
        for run, (name, policy) in enumerate(runs):
            wrap(model, policy)
            try:
                for i, batch in enumerate(batches):
                    bar.set_postfix_str(f"{policy.label} input {i}")
                    timing = ttft(model, dict(batch), repeats=repeats, warmup=warmup)
                    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
                    record = last_record(model)
                    if record is None:
                        raise RuntimeError(
                            f"{policy.label} left no record: the inputs hold no video the {type(model).__name__} "
                            "adapter recognises"
                        )
                    records[(run, i)] = record
                    new = out[:, batch["input_ids"].shape[1] :]
                    texts = _decode(processor, new)
                    for r, rec in enumerate(record):
                        before = int(rec.video_tokens_before)
                        after = int(rec.video_tokens_after)
                        rows.append(
                            {
                                "run": run,
                                "policy": name,
                                "label": policy.label,
                                "retain": float(policy.retain),
                                "input": i,
                                "row": r,
                                "tokens_before": before,
                                "tokens_kept": after,
                                "kept_fraction": after / before if before else float("nan"),
                                "policy_s": float(rec.seconds),
                                "ttft_s": float(timing.median),
                                "ttft_p90_s": float(timing.p90),
                                "new_tokens": int(new.shape[1]),
                                "text": None if texts is None else texts[r],
                            }
                        )
                    bar.update(1)
            finally:
                unwrap(model)
    finally:
        bar.close()
    return Comparison(rows, records)

