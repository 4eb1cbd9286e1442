"""``make bench``: run every benchmark side by side, write bench/results.json and the tables in bench/README.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench import ace, chain_memory, counterfactual, ddim_throughput, guided_step, invariant, lightningdit, noise, pcfe
from bench.common import machine

HERE = Path(__file__).resolve().parent
# the methods' benchmarks: each module has run(device) -> dict, rows(result) -> markdown rows, passed(result)
METHOD_BENCHMARKS = {"invariant": invariant, "lightningdit": lightningdit, "ace": ace, "counterfactual": counterfactual,
                     "pcfe": pcfe, "noise": noise}


def _table(results: dict) -> str:
    d, c, m, g = results["ddim_throughput"], results["chain"], results["machine"], results["guided_step"]
    t = c["time"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "") + f"; device `{d['device']}`.",
        "",
        "| benchmark | equidiff | reference | ratio | target | pass |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| unguided DDIM ({d['num_steps']} steps, batch {d['batch_size']}), images/s | "
        f"{d['equidiff_images_per_s']:.1f} | {d['diffusers_images_per_s']:.1f} (DDIMPipeline) | "
        f"{d['ratio']:.3f} | {d['target']} | {'yes' if d['pass'] else 'NO'} |",
        f"| chain peak memory with checkpointing, 50 vs 5 steps (batch {c['batch_size']}), MiB | "
        f"{c['memory']['checkpoint_50_steps_mib']:.0f} | {c['memory']['checkpoint_5_steps_mib']:.0f} | "
        f"{c['memory_ratio_ckpt_50_over_5']:.2f} | {c['memory_target']} | {'yes' if c['memory_pass'] else 'NO'} |",
        f"| chain backward time, with vs without checkpointing ({c['time_steps']} steps), s | "
        f"{t['checkpoint']['backward_s']:.2f} | {t['plain']['backward_s']:.2f} | {t['backward_ratio']:.2f} | "
        f"<= 1.5 | {'yes' if c['time_pass'] else 'NO'} |",
        f"| guided DDIM step vs UNet forward + classifier ({g['classifier']}) forward+backward (batch "
        f"{g['batch_size']}), s | {g['guided_step_s']:.3f} | "
        f"{g['unet_forward_s'] + g['classifier_forward_backward_s']:.3f}"
        f" | {g['ratio']:.3f} | {g['target']} | {'yes' if g['pass'] else 'NO'} |",
        *[row for name, mod in METHOD_BENCHMARKS.items() if name in results for row in mod.rows(results[name])],
        "",
        "For context (same run): without checkpointing the chain's peak memory is "
        f"{c['memory']['plain_5_steps_mib']:.0f} MiB at 5 steps and {c['memory']['plain_50_steps_mib']:.0f} MiB "
        f"at 50 steps; forward + backward (one optimisation iteration) takes "
        f"{t['checkpoint']['forward_backward_s']:.2f} s with and {t['plain']['forward_backward_s']:.2f} s without "
        f"checkpointing (ratio {t['forward_backward_ratio']:.2f}).",
        *([] if "saved_for_backward" not in c else [
            "Tensors the forward pass keeps for the backward pass (autograd's saved tensors, no allocator effects): "
            f"{c['saved_for_backward']['checkpoint_5_steps_mib']:.2f} MiB at 5 steps and "
            f"{c['saved_for_backward']['checkpoint_50_steps_mib']:.2f} MiB at 50 steps with checkpointing (each "
            f"step's input), {c['saved_for_backward']['plain_5_steps_mib']:.0f} MiB and "
            f"{c['saved_for_backward']['plain_50_steps_mib']:.0f} MiB without."]),
    ]
    return "\n".join(lines)


def _in_fresh_process(name: str, device: str) -> dict:
    """``bench.<name>.run(device)`` in its own Python process. Each method benchmark measures its two sides in one
    run; a fresh process keeps the state earlier benchmarks leave behind (a fragmented heap, warmed thread pools)
    out of its numbers (in one process after the counterfactual benchmark, batched p-CFE ran 20-35% slower)."""
    code = (f"import json, sys; from bench import {name} as m; "
            "print('BENCH-RESULT ' + json.dumps(m.run(device=sys.argv[1])))")
    res = subprocess.run([sys.executable, "-c", code, device], capture_output=True, text=True, cwd=HERE.parent)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("BENCH-RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"bench {name} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("BENCH-RESULT "))


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"machine": machine()}
    print("bench: unguided DDIM throughput ...", flush=True)
    results["ddim_throughput"] = ddim_throughput.run(device=device)
    print(json.dumps(results["ddim_throughput"], indent=1), flush=True)
    print("bench: guided DDIM step ...", flush=True)
    results["guided_step"] = guided_step.run(device=device)
    print(json.dumps(results["guided_step"], indent=1), flush=True)
    print("bench: differentiable chain memory and time ...", flush=True)
    results["chain"] = chain_memory.run(device=device)
    print(json.dumps(results["chain"], indent=1), flush=True)
    for name in METHOD_BENCHMARKS:
        print(f"bench: {name} ...", flush=True)
        results[name] = _in_fresh_process(name, device)
        print(json.dumps(results[name], indent=1), flush=True)

    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = _table(results)
    readme = HERE / "README.md"
    text = readme.read_text()
    key = "gpu" if device == "cuda" else "cpu"
    text = re.sub(rf"(<!--RESULTS:{key}-->\n).*?(\n<!--/RESULTS:{key}-->)", lambda mt: mt.group(1) + table
                  + mt.group(2), text, flags=re.S)
    readme.write_text(text)
    print("\n" + table)
    ok = (results["ddim_throughput"]["pass"] and results["chain"]["memory_pass"] and results["chain"]["time_pass"]
          and results["guided_step"]["pass"] and all(mod.passed(results[n]) for n, mod in METHOD_BENCHMARKS.items()))
    print("\nall targets met" if ok else "\nsome targets NOT met (see above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
