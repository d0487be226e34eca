"""``ets search``: run one search against a search service and print it (or ``--json``).

    ets search "What is 2 + 3?" --addr localhost:50051 --method ets --width 16 [--stream] [--json]

Every ``SearchConfig`` field is a flag (``--max-step-tokens``, ``--lambda-s``, ...); unset flags
take the server's defaults. The channel retries UNAVAILABLE and RESOURCE_EXHAUSTED with backoff
(a gRPC retry policy), so a search sent while the service restarts or is at capacity is
retried rather than lost. Exit status: 0 on success, 1 on an RPC error (code and message on
stderr), 2 on bad usage.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, Callable, Sequence, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.errors import FieldError
from ets.security import ClientSecurity
from ets.security import channel as secure_channel
from ets.settings import parse_bool

DEFAULT_ADDR = "localhost:50051"


def retry_service_config(max_attempts: int) -> str:
    """gRPC service config: retry UNAVAILABLE / RESOURCE_EXHAUSTED with exponential backoff."""
    return json.dumps({
        "methodConfig": [{
            "name": [{"service": "ets.api.v1.SearchService"}],
            "retryPolicy": {
                "maxAttempts": max(2, min(max_attempts, 5)),
                "initialBackoff": "0.5s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }]
    })


def channel_options(retries: int) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if retries > 0:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(retries + 1))]
    else:
        options += [("grpc.enable_retries", 0)]
    return options


# (flag, env var, ClientSecurity field, help): how ``ets search`` / ``ets eval`` reach a search
# service with TLS (``ETS_SEARCH_TLS_CERT_FILE`` set) or mTLS and a bearer token.
_SECURITY_FLAGS = (
    ("--tls-ca", "ETS_SEARCH_TLS_CA_FILE", "ca_file", "CA certificate to verify the service with (enables TLS)"),
    ("--tls-cert", "ETS_SEARCH_TLS_CLIENT_CERT_FILE", "cert_file", "client certificate (mTLS)"),
    ("--tls-key", "ETS_SEARCH_TLS_CLIENT_KEY_FILE", "key_file", "client private key (mTLS)"),
    ("--token-file", "ETS_SEARCH_AUTH_TOKEN_FILE", "token_file", "file holding the bearer token"),
)


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transport security (default: plaintext, no token)")
    for flag, env, field, text in _SECURITY_FLAGS:
        group.add_argument(flag, dest=f"sec_{field}", default=os.environ.get(env, ""), metavar="FILE",
                           help=f"{text} ({env})")


def security_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClientSecurity:
    """The client security the flags/env name; a missing or unreadable file exits 2 naming it."""
    sec = ClientSecurity(**{field: getattr(args, f"sec_{field}") for _, _, field, _ in _SECURITY_FLAGS},
                         env_prefix="ETS_SEARCH_")
    try:
        sec.check()
    except FieldError as err:
        parser.error(str(err))
    return sec


_TYPES: dict[int, Callable[[str], Any]] = {
    FieldDescriptor.TYPE_INT32: int, FieldDescriptor.TYPE_INT64: int, FieldDescriptor.TYPE_UINT64: int,
    FieldDescriptor.TYPE_UINT32: int, FieldDescriptor.TYPE_DOUBLE: float, FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_STRING: str, FieldDescriptor.TYPE_BOOL: parse_bool,
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per proto SearchConfig field (default None = server default)."""
    group = parser.add_argument_group("search config (unset = server default)")
    for field in search_pb2.SearchConfig.DESCRIPTOR.fields:
        group.add_argument("--" + field.name.replace("_", "-"), dest=f"cfg_{field.name}",
                           type=_TYPES[field.type], default=None, metavar=field.name.upper())


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every caller of a search service takes (``ets search``, ``ets eval``): where it is
    (``--addr``), how to reach it (transport security) and the search config, one flag per field."""
    parser.add_argument("--addr", default=os.environ.get("ETS_SEARCH_ADDR", DEFAULT_ADDR),
                        help=f"search service host:port (ETS_SEARCH_ADDR, default {DEFAULT_ADDR})")
    _add_security_flags(parser)
    _add_config_flags(parser)


def config_from_args(args: argparse.Namespace) -> search_pb2.SearchConfig:
    config = search_pb2.SearchConfig()
    for field in search_pb2.SearchConfig.DESCRIPTOR.fields:
        value = getattr(args, f"cfg_{field.name}", None)
        if value is not None:
            setattr(config, field.name, value)
    return config


# ---- printing ---------------------------------------------------------------------------------

def _one_line(text: str, limit: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def format_response(response: search_pb2.SearchResponse, *, max_candidates: int = 10) -> str:
    """A readable summary: answer, best trajectory, candidates, statistics."""
    c, s = response.config, response.stats
    lines = [
        f"method {c.method}  width {c.width}  policy {c.policy_model_type}  prm {c.prm_type}"
        + (f"  request {response.request_id}" if response.request_id else ""),
        f"answer: {response.answer or '(none extracted)'}",
        *format_votes(response),
    ]
    if response.HasField("best"):
        b = response.best
        lines += [
            f"best trajectory (score {b.aggregate_score:.3f}, {b.finish_reason}, depth {b.depth}, {b.tokens} tokens):",
            *("    " + line for line in (b.text.strip() or "(empty)").splitlines()[:12]),
        ]
    lines.append(f"candidates ({len(response.candidates)} finished):")
    lines.append(f"  {'#':>3} {'score':>6} {'finish':<10} {'depth':>5} {'tokens':>6}  answer / text")
    ranked = sorted(enumerate(response.candidates), key=lambda ic: -ic[1].aggregate_score)
    for i, cand in ranked[:max_candidates]:
        shown = cand.answer or _one_line(cand.text, 60)
        lines.append(f"  {i:>3} {cand.aggregate_score:>6.3f} {cand.finish_reason:<10} {cand.depth:>5} "
                     f"{cand.tokens:>6}  {shown}")
    if len(ranked) > max_candidates:
        lines.append(f"  ... {len(ranked) - max_candidates} more (--json prints all)")
    reuse = s.cached_prompt_tokens / s.prompt_tokens if s.prompt_tokens else 0.0
    lines += [
        "stats:",
        f"  KV tokens (logical): total {s.total_kv_tokens}, peak {s.peak_kv_tokens} over {s.selections} selections",
        f"  policy: {s.model_calls} step samples, {s.generated_tokens} generated tokens, "
        f"{s.prompt_tokens} prompt tokens ({s.cached_prompt_tokens} from prefix cache, reuse {reuse:.1%})",
        f"  depth reached {s.depth_reached}; solver fallbacks {s.solver_fallbacks}"
        + (f"; stopped early (vote decided), {s.width_left} width left" if s.stopped_early else ""),
        f"  time: wall {s.wall_seconds:.2f}s = policy {s.policy_seconds:.2f}s + reward {s.reward_seconds:.2f}s "
        f"+ selection {s.selection_seconds:.3f}s + other",
    ]
    return "\n".join(lines)


def _vote_line(v: search_pb2.AnswerVote, voting: str) -> str:
    what = {"majority": "votes", "best": "best score"}.get(voting, "summed score")
    n = f"{v.trajectories} trajector{'y' if v.trajectories == 1 else 'ies'}"
    return f"{v.answer!r}: {n}, {what} {v.vote:.3g} (best {v.best_score:.3g})"


def format_votes(response: search_pb2.SearchResponse) -> list[str]:
    """Why the answer won: its group against the runner-up (and how many other answers)."""
    votes = list(response.votes)
    if not votes:
        return []
    voting = response.config.voting or "weighted_majority"
    lines = [f"vote ({voting}): {_vote_line(votes[0], voting)}"]
    if len(votes) > 1:
        runner_up = votes[1]
        tie = ""
        if runner_up.vote == votes[0].vote:
            tie = (" (tied vote: the higher best score wins)" if runner_up.best_score != votes[0].best_score
                   else " (tied vote and best score: the answer seen first wins)")
        lines.append(f"  runner-up {_vote_line(runner_up, voting)}{tie}"
                     + (f"; {len(votes) - 2} other answer{'s' if len(votes) > 3 else ''}" if len(votes) > 2 else ""))
    else:
        lines.append("  no other answer")
    return lines


def format_progress(p: search_pb2.DepthProgress) -> str:
    return (f"depth {p.depth:>2}: frontier {p.frontier_size:>3}, kept {p.kept_candidates:>3}, "
            f"KV {p.kv_tokens:>6} tokens, remaining width {p.remaining_width:>3}, finished {p.finished:>3}, "
            f"{p.elapsed_seconds:.2f}s")


def to_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


# ---- calling ----------------------------------------------------------------------------------

async def run_search(addr: str, request: search_pb2.SearchRequest, *, timeout: float | None,
                     stream: bool = False, retries: int = 3, progress: TextIO | None = None,
                     security: ClientSecurity | None = None,
                     ) -> tuple[search_pb2.SearchResponse, list[search_pb2.DepthProgress]]:
    """One search over a fresh channel; returns the response and the streamed progress events."""
    events: list[search_pb2.DepthProgress] = []
    async with secure_channel(addr, security, options=channel_options(retries)) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        if not stream:
            return await stub.Search(request, timeout=timeout), events
        response: search_pb2.SearchResponse | None = None
        async for event in stub.SearchStream(request, timeout=timeout):
            if event.HasField("progress"):
                events.append(event.progress)
                if progress is not None:
                    print(format_progress(event.progress), file=progress, flush=True)
            else:
                response = event.result
        if response is None:
            raise RuntimeError("stream ended without a result")
        return response, events


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ets search", description="run one search and print the result")
    parser.add_argument("problem", nargs="?", help="the problem text ('-' or omitted: read stdin)")
    add_service_flags(parser)
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    parser.add_argument("--stream", action="store_true", help="use SearchStream and print progress per depth")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE / RESOURCE_EXHAUSTED")
    parser.add_argument("--request-id", default="")
    parser.add_argument("--candidates", type=int, default=10, help="candidates to list (text output)")
    parser.add_argument("--summary-only", action="store_true",
                        help="ask for the answer, best trajectory and stats only (no candidate list)")
    return parser


def main(argv: Sequence[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    problem = args.problem
    if problem is None or problem == "-":
        problem = sys.stdin.read()
    request = search_pb2.SearchRequest(problem=problem, config=config_from_args(args), request_id=args.request_id,
                                       summary_only=args.summary_only)
    security = security_from_args(parser, args)
    try:
        response, events = asyncio.run(run_search(
            args.addr, request, timeout=args.timeout, stream=args.stream, retries=args.retries,
            progress=None if args.json else sys.stdout, security=security))
    except grpc.aio.AioRpcError as err:
        print(f"ets search: {args.addr}: {err.code().name}: {err.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json:
        out: dict[str, Any] = to_json(response)
        if args.stream:
            out = {"progress": [to_json(e) for e in events], "result": out}
        print(json.dumps(out, indent=2))
    else:
        print(format_response(response, max_candidates=args.candidates))


if __name__ == "__main__":
    main(sys.argv[1:])
