"""What a recipe will cost, before anything runs: teacher and judge tokens and dollars at the
configured prices, training tokens, FLOPs and accelerator-hours at a stated MFU.

The arithmetic, stated once (the dry run prints it too):

    teacher requests   = ceil(num_instructions / records_per_request), capped by max_requests and
                         by max_cost_usd (no request is sent once it is spent)
    teacher tokens     = requests x (prompt tokens of the real prompts + completion tokens per request)
    training tokens    = training records x mean tokens per example (as `train` tokenises them) x epochs
                         (max_steps: steps x global batch x max_seq_len, packed rows being full;
                         other batching: x tokens per example)
    training FLOPs     = k x parameters x training tokens, k = 6 (full: forward 2, backward 4) or
                         4 (LoRA/QLoRA: the frozen weights get no gradient, saving a third)
    accelerator-hours  = FLOPs / (MFU x peak FLOP/s) / 3600; wall hours = that / processes
    judge tokens       = judgements x (prompt with two answers of max_new_tokens + judge max_new_tokens)

Token counts use the model's own tokenizer where it is on this machine, else 4 characters per
token (said so in the forecast).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..core.hardware import PEAK_TFLOPS, flops_per_token_factor

CHARS_PER_TOKEN = 4  # the estimate when no tokenizer is at hand


@dataclass(frozen=True)
class TeacherForecast:
    requests: int
    prompt_tokens_per_request: float
    completion_tokens_per_request: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    capped_by_max_cost: bool
    counted_with: str  # "tokenizer" or "4 characters per token"
    price_factor: float = 1.0  # a batch teacher's share of the list price (1 - batch_discount)
    method: str = "self-instruct"


@dataclass(frozen=True)
class TrainForecast:
    records: int  # training records (after the validation split)
    tokens_per_example: float
    epochs: float
    tokens: int
    parameters: int
    flops_per_token_factor: int  # 6 full, 4 LoRA
    flops: float
    gpu: str
    peak_tflops: float
    mfu: float
    processes: int
    accelerator_hours: float
    wall_hours: float
    cost_usd: float
    counted_with: str


@dataclass(frozen=True)
class JudgeForecast:
    judgements: int
    prompt_tokens_per_judgement: float
    completion_tokens_per_judgement: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    counted_with: str
    price_factor: float = 1.0  # a batch judge's share of the list price


@dataclass(frozen=True)
class Forecast:
    teacher: TeacherForecast | None
    train: TrainForecast | None
    judge: JudgeForecast | None
    inference_tokens: int  # at most: the infer stage's answers, before and after

    @property
    def cost_usd(self) -> float:
        return sum(x.cost_usd for x in (self.teacher, self.train, self.judge) if x is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": asdict(self.teacher) if self.teacher else None,
            "train": asdict(self.train) if self.train else None,
            "judge": asdict(self.judge) if self.judge else None,
            "inference_tokens": self.inference_tokens,
            "cost_usd": round(self.cost_usd, 4),
        }

    def lines(self) -> list[str]:
        out = []
        t = self.teacher
        if t:
            cap = " (capped by max_cost_usd)" if t.capped_by_max_cost else ""
            batch = f" (batch: {t.price_factor:g} x the list price)" if t.price_factor != 1 else ""
            method = f" [{t.method}]" if t.method != "self-instruct" else ""
            out.append(
                f"teacher{method}: {t.requests} requests x ({t.prompt_tokens_per_request:.0f} prompt + "
                f"{t.completion_tokens_per_request} completion tokens) = {t.prompt_tokens:,} + "
                f"{t.completion_tokens:,} tokens, {_usd_or_unpriced(t.cost_usd, TEACHER_PRICES)}{batch}{cap} "
                f"[{t.counted_with}]"
            )
        tr = self.train
        if tr:
            out.append(
                f"training: {tr.records:,} records x {tr.tokens_per_example:.0f} tokens x {tr.epochs:g} epochs = "
                f"{tr.tokens:,} tokens; {tr.flops_per_token_factor} x {tr.parameters / 1e6:,.1f}M params x tokens = "
                f"{tr.flops:.3g} FLOPs; at {tr.mfu:.0%} MFU of {tr.peak_tflops:g} TFLOP/s ({tr.gpu}): "
                f"{tr.accelerator_hours:.3g} {'CPU' if tr.gpu == 'cpu' else 'GPU'}-hours, "
                f"{tr.wall_hours:.3g} h on {tr.processes}, {_usd_or_unpriced(tr.cost_usd, GPU_PRICE)} "
                f"[{tr.counted_with}]"
            )
        j = self.judge
        if j:
            batch = f" (batch: {j.price_factor:g} x the list price)" if j.price_factor != 1 else ""
            out.append(
                f"judge: {j.judgements} judgements x ({j.prompt_tokens_per_judgement:.0f} prompt + "
                f"{j.completion_tokens_per_judgement} completion tokens) = {j.prompt_tokens:,} + "
                f"{j.completion_tokens:,} tokens, {_usd_or_unpriced(j.cost_usd, JUDGE_PRICES)}{batch} [{j.counted_with}]"
            )
        if self.inference_tokens:
            out.append(f"inference: at most {self.inference_tokens:,} tokens (before and after fine-tuning)")
        out.append(f"total: ${self.cost_usd:.2f} at the configured prices")
        return out


# The recipe keys that price each part, named where a part has no price.
TEACHER_PRICES = "stages.generate.price_prompt_per_1m and price_completion_per_1m"
GPU_PRICE = "forecast.gpu_usd_per_hour"
JUDGE_PRICES = "forecast.judge_price_prompt_per_1m and judge_price_completion_per_1m"


def _usd_or_unpriced(cost: float, keys: str) -> str:
    """$X.XX, or $0.00 with the keys that would price it (a server's tokens are rarely free)."""
    return f"${cost:.2f}" if cost else f"$0.00 (no price set: {keys})"


def _usd(prompt: float, completion: float, price_prompt: float, price_completion: float) -> float:
    return (prompt * price_prompt + completion * price_completion) / 1e6


def teacher(
    per_prompt: float,
    counted_with: str,
    *,
    num_instructions: int,
    records_per_request: float,
    max_requests: int | None,
    completion_tokens_per_request: int,
    price_prompt_per_1m: float,
    price_completion_per_1m: float,
    max_cost_usd: float | None,
    price_factor: float = 1.0,
    method: str = "self-instruct",
) -> TeacherForecast:
    """`per_prompt`: a request's prompt tokens (the mean of the first requests' real prompts);
    `price_factor`: the share of the list prices paid (a batch teacher's 1 - discount)."""
    price_prompt_per_1m *= price_factor
    price_completion_per_1m *= price_factor
    requests = math.ceil(num_instructions / records_per_request)
    if max_requests is not None:
        requests = min(requests, max_requests)
    per_request_usd = _usd(
        per_prompt, completion_tokens_per_request, price_prompt_per_1m, price_completion_per_1m
    )
    capped = max_cost_usd is not None and requests * per_request_usd > max_cost_usd
    if capped and max_cost_usd is not None:  # generate sends no request once the limit is spent
        requests = math.ceil(max_cost_usd / per_request_usd)
    prompt_tokens = round(requests * per_prompt)
    completion_tokens = requests * completion_tokens_per_request
    return TeacherForecast(
        requests,
        per_prompt,
        completion_tokens_per_request,
        prompt_tokens,
        completion_tokens,
        _usd(prompt_tokens, completion_tokens, price_prompt_per_1m, price_completion_per_1m),
        capped,
        counted_with,
        price_factor,
        method,
    )


def training(
    *,
    records: int,
    tokens_per_example: float,
    epochs: float,
    max_steps: int,
    rows_per_step: int,
    max_seq_len: int,
    packed: bool,
    parameters: int,
    method: str,
    gpu: str,
    peak_tflops: float | None,
    mfu: float,
    processes: int,
    usd_per_hour: float,
    counted_with: str,
) -> TrainForecast:
    if max_steps > 0:  # packed rows are full windows; other batches hold one example a row
        tokens = (
            max_steps
            * rows_per_step
            * (max_seq_len if packed else min(max_seq_len, round(tokens_per_example)))
        )
    else:
        tokens = round(records * tokens_per_example * epochs)
    factor = flops_per_token_factor(method)
    flops = float(factor) * parameters * tokens
    peak = peak_tflops or PEAK_TFLOPS[gpu]
    hours = flops / (mfu * peak * 1e12) / 3600
    return TrainForecast(
        records,
        tokens_per_example,
        epochs,
        tokens,
        parameters,
        factor,
        flops,
        gpu,
        peak,
        mfu,
        processes,
        hours,
        hours / processes,
        hours * usd_per_hour,
        counted_with,
    )


def judge(
    prompt_tokens_per_judgement: float,
    counted_with: str,
    *,
    items: int,
    both_orders: bool,
    completion_tokens: int,
    price_prompt_per_1m: float,
    price_completion_per_1m: float,
    price_factor: float = 1.0,
) -> JudgeForecast:
    price_prompt_per_1m *= price_factor
    price_completion_per_1m *= price_factor
    n = items * (2 if both_orders else 1)
    prompt = round(n * prompt_tokens_per_judgement)
    completion = n * completion_tokens
    return JudgeForecast(
        n,
        prompt_tokens_per_judgement,
        completion_tokens,
        prompt,
        completion,
        _usd(prompt, completion, price_prompt_per_1m, price_completion_per_1m),
        counted_with,
        price_factor,
    )
