"""Python bindings for verity's C ABI (ctypes; no compiled extension).

    from verity import Runtime
    with Runtime("models/SmolLM2-135M-Instruct.Q4_1.gguf") as rt:
        result = rt.generate("What is 17 * 23?", chat=True, n=8, temperature=0.8,
                             max_tokens=128, seed=42, selection="borda:0.5")
        print(result.answer, result.traces[result.selected].text)
        rt.feedback(result.traces[0].id, 1.0)
        print(rt.learn_step())

The library is found via $VERITY_LIB (a path to libverity.so), else in the checkout's
target/release (this file is bindings/python/verity/__init__.py), else by the system
loader. Errors raise VerityError with the status name and verity_last_error()'s message.
A Runtime may be used from several threads at once (ctypes releases the GIL during calls).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
from ctypes import (
    POINTER,
    Structure,
    byref,
    c_bool,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int32,
    c_size_t,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = [
    "Runtime",
    "GenerateResult",
    "Trace",
    "Vote",
    "LearnReport",
    "VerityError",
    "version",
]

STATUS_NAMES = {
    0: "VERITY_OK",
    1: "VERITY_ERR_INVALID_ARGUMENT",
    2: "VERITY_ERR_NULL_POINTER",
    3: "VERITY_ERR_UTF8",
    4: "VERITY_ERR_OUT_OF_RANGE",
    5: "VERITY_ERR_NOT_FOUND",
    6: "VERITY_ERR_BUSY",
    7: "VERITY_ERR_MODEL",
    8: "VERITY_ERR_IO",
    9: "VERITY_ERR_CANCELLED",
    10: "VERITY_ERR_INVALID_HANDLE",
    11: "VERITY_ERR_PANIC",
    12: "VERITY_ERR_INTERNAL",
    13: "VERITY_ERR_UNAVAILABLE",
}
VERITY_ERR_NOT_FOUND = 5
VERITY_ERR_CANCELLED = 9
FINISH_REASONS = {0: "stop", 1: "length", 2: "aborted", 3: "aborted_low_confidence", 4: "unneeded"}


class VerityError(Exception):
    """A failed call: `status` (int), `name` ("VERITY_ERR_NOT_FOUND") and `message`."""

    def __init__(self, status: int, message: str, call: str = ""):
        self.status = status
        self.name = STATUS_NAMES.get(status, f"status {status}")
        self.message = message
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{self.name}: {message}")


# --- C declarations (bindings/c/verity.h) -------------------------------------------------


class _RuntimeParams(Structure):
    _fields_ = [
        ("kv_budget_tokens", c_size_t),
        ("max_batch", c_size_t),
        ("max_queued_requests", c_size_t),
        ("lora_rank", c_size_t),
        ("lora_alpha", c_double),
        ("learn_min_traces", c_size_t),
        ("serve_learn_adapter", c_bool),
        ("dense", c_bool),
        ("adapter_dir", c_char_p),
        ("device", c_char_p),
        ("config_path", c_char_p),
    ]


class _GenerateParams(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("chat", c_bool),
        ("n", c_size_t),
        ("max_tokens", c_size_t),
        ("temperature", c_float),
        ("top_p", c_float),
        ("top_k", c_size_t),
        ("min_p", c_float),
        ("seed", c_uint64),
        ("stop", POINTER(c_char_p)),
        ("n_stop", c_size_t),
        ("ignore_eos", c_bool),
        ("adapter", c_char_p),
        ("selection", c_char_p),
        ("verifier", c_char_p),
        ("reference", c_char_p),
        ("top_logprobs", c_size_t),
    ]


class _TokenStats(Structure):
    _fields_ = [
        ("logprob", c_float),
        ("entropy", c_float),
        ("self_certainty", c_float),
        ("confidence", c_float),
    ]


class _TraceStats(Structure):
    _fields_ = [
        ("n", c_size_t),
        ("logprob", POINTER(c_float)),
        ("entropy", POINTER(c_float)),
        ("self_certainty", POINTER(c_float)),
        ("confidence", POINTER(c_float)),
    ]


class _LearnReport(Structure):
    _fields_ = [
        ("step", c_uint64),
        ("version", c_uint64),
        ("applied", c_bool),
        ("skipped", c_bool),
        ("skipped_reason", c_char_p),
        ("loss", c_double),
        ("reward_mean", c_double),
        ("grad_norm", c_double),
        ("groups_used", c_size_t),
        ("groups_skipped", c_size_t),
        ("tokens", c_size_t),
        ("train_seconds", c_double),
    ]


_TOKEN_CALLBACK = ctypes.CFUNCTYPE(
    c_int, c_size_t, c_int32, c_char_p, c_size_t, POINTER(_TokenStats), c_void_p
)
_VERIFIER_FN = ctypes.CFUNCTYPE(c_double, c_char_p, c_char_p, c_void_p)


def _find_library() -> str:
    env = os.environ.get("VERITY_LIB")
    if env:
        return env
    checkout = Path(__file__).resolve().parents[3]
    for profile in ("release", "debug"):
        candidate = checkout / "target" / profile / "libverity.so"
        if candidate.is_file():
            return str(candidate)
    found = ctypes.util.find_library("verity")
    if found:
        return found
    raise OSError(
        "libverity not found: run `cargo build --release` in the checkout or set VERITY_LIB"
    )


def _declare(lib: ctypes.CDLL) -> None:
    P = c_void_p  # handles
    S = c_int  # verity_status
    sigs = {
        "verity_last_error": (c_char_p, []),
        "verity_version": (c_char_p, []),
        "verity_runtime_default_params": (_RuntimeParams, []),
        "verity_runtime_new": (S, [c_char_p, _RuntimeParams, POINTER(P)]),
        "verity_runtime_free": (S, [P]),
        "verity_runtime_model_name": (S, [P, POINTER(c_char_p)]),
        "verity_runtime_status_json": (S, [P, POINTER(c_char_p)]),
        "verity_generate_default_params": (_GenerateParams, []),
        "verity_generate_stream": (
            S,
            [P, POINTER(_GenerateParams), _TOKEN_CALLBACK, c_void_p, POINTER(P)],
        ),
        "verity_result_free": (S, [P]),
        "verity_result_n_traces": (S, [P, POINTER(c_size_t)]),
        "verity_result_info": (
            S,
            [P, POINTER(c_uint64), POINTER(c_size_t), POINTER(c_char_p), POINTER(c_char_p)],
        ),
        "verity_result_trace_text": (S, [P, c_size_t, POINTER(c_void_p), POINTER(c_size_t)]),
        "verity_result_trace_tokens": (
            S,
            [P, c_size_t, POINTER(POINTER(c_int32)), POINTER(c_size_t)],
        ),
        "verity_result_trace_stats": (S, [P, c_size_t, POINTER(_TraceStats)]),
        "verity_result_trace_top_logprobs": (
            S,
            [
                P,
                c_size_t,
                c_size_t,
                POINTER(POINTER(c_int32)),
                POINTER(POINTER(c_float)),
                POINTER(c_size_t),
            ],
        ),
        "verity_result_trace_finish_reason": (S, [P, c_size_t, POINTER(c_int)]),
        "verity_result_trace_id": (S, [P, c_size_t, POINTER(c_uint64)]),
        "verity_result_trace_answer": (S, [P, c_size_t, POINTER(c_char_p)]),
        "verity_result_trace_n_scores": (S, [P, c_size_t, POINTER(c_size_t)]),
        "verity_result_trace_score_at": (
            S,
            [P, c_size_t, c_size_t, POINTER(c_char_p), POINTER(c_double)],
        ),
        "verity_result_trace_reward": (S, [P, c_size_t, POINTER(c_double)]),
        "verity_result_selected": (S, [P, POINTER(c_size_t)]),
        "verity_result_answer": (S, [P, POINTER(c_char_p)]),
        "verity_result_n_votes": (S, [P, POINTER(c_size_t)]),
        "verity_result_vote": (
            S,
            [P, c_size_t, POINTER(c_char_p), POINTER(c_double), POINTER(c_size_t)],
        ),
        "verity_register_verifier": (S, [P, c_char_p, _VERIFIER_FN, c_void_p]),
        "verity_feedback": (S, [P, c_uint64, c_double]),
        "verity_learn_step": (S, [P, POINTER(_LearnReport)]),
        "verity_learning_start": (S, [P, c_size_t]),
        "verity_learning_stop": (S, [P]),
        "verity_learning_adapter": (S, [P, POINTER(c_char_p)]),
        "verity_adapter_version": (S, [P, c_char_p, POINTER(c_uint64)]),
        "verity_adapter_save": (S, [P, c_char_p, c_char_p, POINTER(c_char_p)]),
        "verity_adapter_load": (S, [P, c_char_p, c_char_p]),
        "verity_adapter_select": (S, [P, c_char_p]),
        "verity_adapter_remove": (S, [P, c_char_p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


_lib: Optional[ctypes.CDLL] = None


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(_find_library())
        _declare(lib)
        _lib = lib
    return _lib


def _check(status: int, call: str) -> None:
    if status != 0:
        message = _library().verity_last_error().decode("utf-8", "replace")
        raise VerityError(status, message, call)


def _call(name: str, *args) -> None:
    _check(getattr(_library(), name)(*args), name)


def _enc(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else s.encode("utf-8")


def _dec(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else b.decode("utf-8", "replace")


def version() -> str:
    return _library().verity_version().decode()


# --- Results ------------------------------------------------------------------------------


@dataclass
class Trace:
    index: int
    id: int
    """The id `Runtime.feedback` takes."""
    text: str
    tokens: List[int]
    logprob: List[float]
    entropy: List[float]
    self_certainty: List[float]
    confidence: List[float]
    finish_reason: str
    answer: Optional[str]
    scores: Dict[str, float]
    reward: Optional[float]
    """The verifier's reward (None when the request named no verifier)."""
    top_logprobs: List[List[tuple]] = field(default_factory=list)
    """Per token, [(token id, log-prob), ...] when `top_logprobs` was asked for."""


@dataclass
class Vote:
    answer: str
    weight: float
    count: int


@dataclass
class GenerateResult:
    request_id: int
    prompt_tokens: int
    adapter: Optional[str]
    selection: Optional[str]
    traces: List[Trace]
    selected: Optional[int]
    answer: Optional[str]
    votes: List[Vote]
    cancelled: bool = False
    """True when the `on_token` callback stopped the request (traces cut short)."""


@dataclass
class LearnReport:
    step: int
    version: int
    applied: bool
    skipped: Optional[str]
    loss: float
    reward_mean: float
    grad_norm: float
    groups_used: int
    groups_skipped: int
    tokens: int
    train_seconds: float


def _read_result(handle: c_void_p, cancelled: bool) -> GenerateResult:
    lib = _library()
    n = c_size_t()
    _check(lib.verity_result_n_traces(handle, byref(n)), "verity_result_n_traces")
    request_id, prompt_tokens = c_uint64(), c_size_t()
    adapter, selection = c_char_p(), c_char_p()
    _check(
        lib.verity_result_info(
            handle, byref(request_id), byref(prompt_tokens), byref(adapter), byref(selection)
        ),
        "verity_result_info",
    )
    traces = []
    for i in range(n.value):
        text_ptr, text_len = c_void_p(), c_size_t()
        _check(
            lib.verity_result_trace_text(handle, i, byref(text_ptr), byref(text_len)),
            "verity_result_trace_text",
        )
        text = ctypes.string_at(text_ptr, text_len.value).decode("utf-8", "replace")
        toks, n_toks = POINTER(c_int32)(), c_size_t()
        _check(
            lib.verity_result_trace_tokens(handle, i, byref(toks), byref(n_toks)),
            "verity_result_trace_tokens",
        )
        tokens = toks[: n_toks.value] if n_toks.value else []
        st = _TraceStats()
        _check(lib.verity_result_trace_stats(handle, i, byref(st)), "verity_result_trace_stats")
        column = lambda p: p[: st.n] if st.n else []  # noqa: E731
        reason, trace_id = c_int(), c_uint64()
        _check(
            lib.verity_result_trace_finish_reason(handle, i, byref(reason)),
            "verity_result_trace_finish_reason",
        )
        _check(lib.verity_result_trace_id(handle, i, byref(trace_id)), "verity_result_trace_id")
        answer = c_char_p()
        _check(
            lib.verity_result_trace_answer(handle, i, byref(answer)), "verity_result_trace_answer"
        )
        n_scores = c_size_t()
        _check(
            lib.verity_result_trace_n_scores(handle, i, byref(n_scores)),
            "verity_result_trace_n_scores",
        )
        scores = {}
        for k in range(n_scores.value):
            name, value = c_char_p(), c_double()
            _check(
                lib.verity_result_trace_score_at(handle, i, k, byref(name), byref(value)),
                "verity_result_trace_score_at",
            )
            scores[name.value.decode()] = value.value
        reward = c_double()
        _check(
            lib.verity_result_trace_reward(handle, i, byref(reward)), "verity_result_trace_reward"
        )
        top = []
        for pos in range(n_toks.value):
            ids, lps, k = POINTER(c_int32)(), POINTER(c_float)(), c_size_t()
            status = lib.verity_result_trace_top_logprobs(
                handle, i, pos, byref(ids), byref(lps), byref(k)
            )
            if status == VERITY_ERR_NOT_FOUND:  # none recorded
                break
            _check(status, "verity_result_trace_top_logprobs")
            top.append([(ids[j], lps[j]) for j in range(k.value)])
        traces.append(
            Trace(
                index=i,
                id=trace_id.value,
                text=text,
                tokens=list(tokens),
                logprob=column(st.logprob),
                entropy=column(st.entropy),
                self_certainty=column(st.self_certainty),
                confidence=column(st.confidence),
                finish_reason=FINISH_REASONS.get(reason.value, str(reason.value)),
                answer=_dec(answer.value),
                scores=scores,
                reward=None if math.isnan(reward.value) else reward.value,
                top_logprobs=top,
            )
        )
    selected = c_size_t()
    status = lib.verity_result_selected(handle, byref(selected))
    if status not in (0, VERITY_ERR_NOT_FOUND):
        _check(status, "verity_result_selected")
    answer = c_char_p()
    _check(lib.verity_result_answer(handle, byref(answer)), "verity_result_answer")
    n_votes = c_size_t()
    _check(lib.verity_result_n_votes(handle, byref(n_votes)), "verity_result_n_votes")
    votes = []
    for k in range(n_votes.value):
        a, w, c = c_char_p(), c_double(), c_size_t()
        _check(lib.verity_result_vote(handle, k, byref(a), byref(w), byref(c)), "verity_result_vote")
        votes.append(Vote(_dec(a.value), w.value, c.value))
    return GenerateResult(
        request_id=request_id.value,
        prompt_tokens=prompt_tokens.value,
        adapter=_dec(adapter.value),
        selection=_dec(selection.value),
        traces=traces,
        selected=selected.value if status == 0 else None,
        answer=_dec(answer.value),
        votes=votes,
        cancelled=cancelled,
    )


# --- Runtime ------------------------------------------------------------------------------


class Runtime:
    """One model with its engine, adapters and learner. Use as a context manager, or call
    close(). Options are the fields of verity_runtime_params (kv_budget_tokens, max_batch,
    max_queued_requests, lora_rank, lora_alpha, learn_min_traces, serve_learn_adapter,
    dense, adapter_dir, device, config_path); device is "auto", "cpu", "cuda" or
    "cuda:N"."""

    def __init__(self, model: Optional[str] = None, **options):
        lib = _library()
        params = lib.verity_runtime_default_params()
        self._keep = []
        for key, value in options.items():
            if key not in dict(_RuntimeParams._fields_):
                raise TypeError(f"unknown runtime option {key!r}")
            if isinstance(value, (str, os.PathLike)):
                value = os.fspath(value).encode("utf-8")
            setattr(params, key, value)
        handle = c_void_p()
        model_path = None if model is None else os.fspath(model).encode("utf-8")
        _call("verity_runtime_new", model_path, params, byref(handle))
        self._handle = handle
        self._verifiers: Dict[str, object] = {}

    # lifetime
    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            _call("verity_runtime_free", handle)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def handle(self) -> c_void_p:
        if self._handle is None:
            raise VerityError(10, "the runtime is closed")
        return self._handle

    # generation
    def generate(
        self,
        prompt: str,
        *,
        chat: bool = False,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        adapter: Optional[str] = None,
        selection: Optional[str] = None,
        verifier: Optional[str] = None,
        reference: Optional[str] = None,
        top_logprobs: int = 0,
        on_token: Optional[Callable[[int, int, str, dict], object]] = None,
    ) -> GenerateResult:
        """Generates n samples. `on_token(trace, token_id, text, stats)` (stats: dict of
        logprob, entropy, self_certainty, confidence) is called for each token; a truthy
        return cancels the request, and the result comes back with cancelled=True."""
        lib = _library()
        p = lib.verity_generate_default_params()
        p.prompt = prompt.encode("utf-8")
        p.chat, p.n, p.max_tokens = chat, n, max_tokens
        p.temperature, p.top_p, p.top_k, p.min_p, p.seed = temperature, top_p, top_k, min_p, seed
        stops = (c_char_p * max(len(stop), 1))(*[s.encode("utf-8") for s in stop])
        p.stop = ctypes.cast(stops, POINTER(c_char_p)) if stop else None
        p.n_stop = len(stop)
        p.ignore_eos = ignore_eos
        p.adapter, p.selection = _enc(adapter), _enc(selection)
        p.verifier, p.reference = _enc(verifier), _enc(reference)
        p.top_logprobs = top_logprobs
        errors: List[BaseException] = []

        def trampoline(trace, token, text, text_len, stats, _user):
            try:
                s = stats.contents
                t = ctypes.string_at(text, text_len).decode("utf-8", "replace")
                stats_dict = {
                    "logprob": s.logprob,
                    "entropy": s.entropy,
                    "self_certainty": s.self_certainty,
                    "confidence": s.confidence,
                }
                return 1 if on_token(trace, token, t, stats_dict) else 0
            except BaseException as e:  # cancel, and re-raise after the call
                errors.append(e)
                return 1

        callback = _TOKEN_CALLBACK(trampoline) if on_token else _TOKEN_CALLBACK()
        out = c_void_p()
        status = lib.verity_generate_stream(self.handle, byref(p), callback, None, byref(out))
        cancelled = status == VERITY_ERR_CANCELLED
        if status != 0 and not cancelled:
            _check(status, "verity_generate_stream")
        try:
            if errors:
                raise errors[0]
            return _read_result(out, cancelled)
        finally:
            _call("verity_result_free", out)

    def register_verifier(self, name: str, fn: Callable[[str, str], float]) -> None:
        """A verifier requests can name: fn(text, reference) -> reward. It may be called
        from engine threads; an exception counts as no reward (NaN)."""

        def trampoline(text, reference, _user):
            try:
                return float(fn(text.decode("utf-8", "replace"), reference.decode("utf-8", "replace")))
            except BaseException:
                return math.nan

        c_fn = _VERIFIER_FN(trampoline)
        _call("verity_register_verifier", self.handle, _enc(name), c_fn, None)
        self._verifiers[name] = c_fn  # keep the C function alive

    # feedback and learning
    def feedback(self, trace_id: int, reward: float) -> None:
        _call("verity_feedback", self.handle, c_uint64(trace_id), c_double(reward))

    def learn_step(self) -> LearnReport:
        r = _LearnReport()
        _call("verity_learn_step", self.handle, byref(r))
        return LearnReport(
            step=r.step,
            version=r.version,
            applied=r.applied,
            skipped=_dec(r.skipped_reason) if r.skipped else None,
            loss=r.loss,
            reward_mean=r.reward_mean,
            grad_norm=r.grad_norm,
            groups_used=r.groups_used,
            groups_skipped=r.groups_skipped,
            tokens=r.tokens,
            train_seconds=r.train_seconds,
        )

    def start_learning(self, min_traces: int = 0) -> None:
        _call("verity_learning_start", self.handle, min_traces)

    def stop_learning(self) -> None:
        _call("verity_learning_stop", self.handle)

    # adapters
    @property
    def learning_adapter(self) -> str:
        s = c_char_p()
        _call("verity_learning_adapter", self.handle, byref(s))
        return s.value.decode()

    def adapter_version(self, adapter_id: str) -> int:
        v = c_uint64()
        _call("verity_adapter_version", self.handle, _enc(adapter_id), byref(v))
        return v.value

    def adapter_save(self, adapter_id: str, directory: Optional[str] = None) -> str:
        path = c_char_p()
        d = None if directory is None else os.fspath(directory).encode("utf-8")
        _call("verity_adapter_save", self.handle, _enc(adapter_id), d, byref(path))
        return path.value.decode()

    def adapter_load(self, adapter_id: str, directory: str) -> None:
        _call("verity_adapter_load", self.handle, _enc(adapter_id), os.fspath(directory).encode())

    def adapter_select(self, adapter_id: Optional[str]) -> None:
        _call("verity_adapter_select", self.handle, _enc(adapter_id))

    def adapter_remove(self, adapter_id: str) -> None:
        _call("verity_adapter_remove", self.handle, _enc(adapter_id))

    # monitoring
    @property
    def model_name(self) -> str:
        s = c_char_p()
        _call("verity_runtime_model_name", self.handle, byref(s))
        return s.value.decode()

    def status(self) -> dict:
        """{"model", "default_adapter", "stats", "learning", "adapters"}."""
        s = c_char_p()
        _call("verity_runtime_status_json", self.handle, byref(s))
        return json.loads(s.value.decode())
