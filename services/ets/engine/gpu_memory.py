"""SGLang 0.5.23's KV pool sizing as arithmetic: do the policy and PRM engines fit their GPUs?

SGLang measures the GPU's free memory B before loading the model (after its CUDA context;
``distributed/bootstrap.py: measure_pre_model_load_memory``) and A after loading the weights, then
gives the KV pool ``A - B * (1 - mem_fraction_static)`` bytes (``mem_cache/kv_cache_configurator.py:
_profile_available_bytes``; refusing to start at <= 0: "Loaded weights leave no GPU memory for the
KV cache"), capped at ``--max-total-tokens`` tokens (``_apply_token_constraints``) of ``cell`` bytes
each (K and V of every layer: 2 x layers x KV heads x head dim x 2 bytes in bf16). The other
``B * (1 - f)`` is left for CUDA graphs and activations.

Two engines on one GPU: the second one's B is whatever the first left, so fractions alone
cannot work in both start orders (each is a share of what is free *then*): the one-GPU profile
caps both pools in tokens and keeps the fraction as the budget check, the CPU recipe's way.

Estimates beyond SGLang's rule (it cannot see them, so neither can this file exactly):
``CUDA_CONTEXT`` per process, ``RUNTIME`` (CUDA graphs and activations of a 7-8B engine at
SGLang's defaults), and the reward server's embedder (its own CUDA context plus the BERT
weights), resident before the PRM engine starts. The GPU smoke (scripts/gpu_smoke.py) measures
the CUDA context and the rule on a real card where one is lent.

Standard library only: scripts/gpu-preflight.sh runs this file with the host's python3
(``python3 services/ets/engine/gpu_memory.py --help``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

GIB = 1 << 30
MIB = 1 << 20
CUDA_CONTEXT = int(0.6 * GIB)
RUNTIME = 3 * GIB
EMBEDDER = int(1.5 * GIB)


@dataclass(frozen=True)
class ModelShape:
    """What sizes an engine: parameter count and the KV layout (bf16 weights and cache)."""

    params: int
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def weights(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def cell(self) -> int:
        """KV bytes per token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


# The configs' numbers (config.json: num_hidden_layers, num_key_value_heads, head_dim).
MISTRAL_7B = ModelShape(params=7_241_732_096, layers=32, kv_heads=8, head_dim=128)
LLAMA31_8B = ModelShape(params=8_030_261_248, layers=32, kv_heads=8, head_dim=128)
QWEN25_MATH_7B = ModelShape(params=7_615_616_512, layers=28, kv_heads=4, head_dim=128)
KNOWN_MODELS: dict[str, ModelShape] = {
    "peiyi9979/mistral-7b-sft": MISTRAL_7B,
    "peiyi9979/math-shepherd-mistral-7b-prm": MISTRAL_7B,
    "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data": LLAMA31_8B,
    "Qwen/Qwen2.5-Math-7B-Instruct": QWEN25_MATH_7B,
    "Qwen/Qwen2.5-Math-PRM-7B": QWEN25_MATH_7B,
}


@dataclass(frozen=True)
class EngineSpec:
    name: str
    model: ModelShape
    fraction: float
    max_tokens: int | None = None
    resident_before: int = 0  # bytes its container holds on the GPU before the engine loads


@dataclass(frozen=True)
class EngineFit:
    name: str
    free_before: int  # B: free memory when the engine measures (after its CUDA context)
    kv_bytes: int  # the pool SGLang allocates (<= 0: it refuses to start)
    kv_tokens: int
    used: int  # everything its container then holds on the GPU
    error: str = ""


@dataclass(frozen=True)
class Profile:
    """The launch settings of the two engines in one deployment shape."""

    policy_fraction: float
    prm_fraction: float
    policy_max_tokens: int | None = None
    prm_max_tokens: int | None = None


# docker-compose.yml (two GPUs: SGLang's pools sized by fraction) and docker-compose.one-gpu.yml
# (one GPU: pools capped in tokens so that either start order fits; ~21.5 and ~17.5 GiB with
# the default Mistral-7B models, 128 KiB per token). tests/deployment/test_gpu_memory.py checks the compose
# files carry these numbers.
PROFILES: dict[str, Profile] = {
    "two-gpu": Profile(policy_fraction=0.85, prm_fraction=0.7),
    "one-gpu": Profile(policy_fraction=0.85, prm_fraction=0.85, policy_max_tokens=176_000, prm_max_tokens=144_000),
}


def kv_pool(spec: EngineSpec, free: int) -> EngineFit:
    """SGLang 0.5.23's rule for one engine starting when ``free`` bytes of its GPU are free."""
    before = free - spec.resident_before - CUDA_CONTEXT
    after = before - spec.model.weights
    if after <= 0:
        return EngineFit(spec.name, before, after, 0, 0, f"{spec.name}: its weights ({_g(spec.model.weights)}) do not "
                         f"fit in the {_g(max(before, 0))} free: out of memory while loading")
    budget = after - int(before * (1 - spec.fraction))
    if budget <= 0:
        need = 1 - after / before
        return EngineFit(spec.name, before, budget, 0, 0, f"{spec.name}: SGLang refuses to start: loaded weights leave "
                         f"no GPU memory for the KV cache at mem_fraction_static {spec.fraction} (needs > {need:.3f})")
    tokens = budget // spec.model.cell
    if spec.max_tokens is not None:
        tokens = min(tokens, spec.max_tokens)
    kv = tokens * spec.model.cell
    used = spec.resident_before + CUDA_CONTEXT + spec.model.weights + kv + RUNTIME
    return EngineFit(spec.name, before, kv, tokens, used)


def share(card: int, specs: list[EngineSpec]) -> list[EngineFit]:
    """Start ``specs`` in order on one GPU of ``card`` bytes, each once the previous one serves.
    An engine that leaves the later ones (or its own runtime) short is reported as failing."""
    fits: list[EngineFit] = []
    free = card
    for spec in specs:
        fit = kv_pool(spec, free)
        fits.append(fit)
        if fit.error:
            return fits
        free -= fit.used
    if free < 0:
        last = fits[-1]
        fits[-1] = EngineFit(last.name, last.free_before, last.kv_bytes, last.kv_tokens, last.used,
                             f"{last.name}: the GPU is {_g(-free)} short once both engines run (CUDA graphs and "
                             "activations): one of them runs out of memory under load")
    return fits


def engine_specs(profile: Profile, policy: ModelShape, prm: ModelShape) -> dict[str, EngineSpec]:
    return {
        "policy": EngineSpec("policy", policy, profile.policy_fraction, profile.policy_max_tokens),
        "prm": EngineSpec("prm", prm, profile.prm_fraction, profile.prm_max_tokens, resident_before=EMBEDDER),
    }


def _g(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def check(profile_name: str, gpus: dict[str, int], policy: ModelShape, prm: ModelShape,
          min_kv_tokens: int, profile: Profile | None = None) -> tuple[bool, list[str]]:
    """``gpus``: engine -> its GPU's memory in bytes (the same card for both in one-gpu);
    ``profile``: the launch settings (default: ``PROFILES[profile_name]``).
    Returns (ok, lines): each engine's pool, in both start orders on one GPU."""
    specs = engine_specs(profile or PROFILES[profile_name], policy, prm)
    runs = ([[specs["policy"], specs["prm"]], [specs["prm"], specs["policy"]]] if profile_name == "one-gpu"
            else [[specs["policy"]], [specs["prm"]]])
    ok, lines = True, []
    for order in runs:
        card = gpus[order[0].name]
        fits = share(card, order)
        prefix = (f"{' then '.join(s.name for s in order)} on one {_g(card)} GPU" if len(order) > 1
                  else f"{order[0].name} on its {_g(card)} GPU")
        for fit in fits:
            if fit.error:
                ok = False
                lines.append(f"FAIL {prefix}: {fit.error}")
            elif fit.kv_tokens < min_kv_tokens:
                ok = False
                lines.append(f"FAIL {prefix}: {fit.name}'s KV pool {_g(fit.kv_bytes)} = {fit.kv_tokens} tokens, "
                             f"below {min_kv_tokens} (one search of width 16 with 2048-token candidates)")
            else:
                lines.append(f"PASS {prefix}: {fit.name}'s KV pool {_g(fit.kv_bytes)} = {fit.kv_tokens} tokens "
                             f"(free before {_g(fit.free_before)}, weights {_g(specs[fit.name].model.weights)})")
    return ok, lines


# One search of width 16 keeps up to 16 candidates of up to ~2048 tokens in the prefix cache.
MIN_KV_TOKENS = 16 * 2048


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="SGLang 0.5.23's KV pool arithmetic for the policy and PRM engines")
    p.add_argument("--profile", choices=sorted(PROFILES), required=True)
    p.add_argument("--policy-gpu-mib", type=int, required=True, help="the policy's GPU memory (nvidia-smi MiB)")
    p.add_argument("--prm-gpu-mib", type=int, help="the PRM's GPU memory (two-gpu)")
    p.add_argument("--policy-model", default="peiyi9979/mistral-7b-sft")
    p.add_argument("--prm-model", default="peiyi9979/math-shepherd-mistral-7b-prm")
    p.add_argument("--min-kv-tokens", type=int, default=MIN_KV_TOKENS)
    # The deployment's own settings where it overrides the profile's (ETS_POLICY_MEM_FRACTION...).
    p.add_argument("--policy-fraction", type=float)
    p.add_argument("--prm-fraction", type=float)
    p.add_argument("--policy-max-tokens", type=int)
    p.add_argument("--prm-max-tokens", type=int)
    args = p.parse_args(argv)
    base = PROFILES[args.profile]
    profile = Profile(
        policy_fraction=args.policy_fraction or base.policy_fraction,
        prm_fraction=args.prm_fraction or base.prm_fraction,
        policy_max_tokens=args.policy_max_tokens or base.policy_max_tokens,
        prm_max_tokens=args.prm_max_tokens or base.prm_max_tokens,
    )
    unknown = [m for m in (args.policy_model, args.prm_model) if m not in KNOWN_MODELS]
    if unknown:
        print(f"WARN no shape known for {', '.join(unknown)}; sized as Mistral-7B "
              f"(known: {', '.join(KNOWN_MODELS)})")
    policy = KNOWN_MODELS.get(args.policy_model, MISTRAL_7B)
    prm = KNOWN_MODELS.get(args.prm_model, MISTRAL_7B)
    gpus = {"policy": args.policy_gpu_mib * MIB, "prm": (args.prm_gpu_mib or args.policy_gpu_mib) * MIB}
    ok, lines = check(args.profile, gpus, policy, prm, args.min_kv_tokens, profile)
    for line in lines:
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
