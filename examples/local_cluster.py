"""Three worker processes on this machine, one of them killed mid-generation.

Run: python examples/local_cluster.py
"""

import os
import signal

import distllm

if __name__ == "__main__":  # worker processes import this script: keep the work behind the guard
    with distllm.local("tiny", workers=4, max_stages=3, quant="nf4", liveness_s=2.0) as cluster:
        print(cluster)
        print("layers:", cluster.layer_map())
        prompt = "The quick brown fox"
        reference = cluster.generate(prompt, max_new_tokens=40, temperature=0.7, seed=1)
        pieces = []
        for i, piece in enumerate(cluster.stream(prompt, max_new_tokens=40, temperature=0.7, seed=1)):
            pieces.append(piece)
            if i == 10:
                first, last, name = cluster.layer_map()[1]
                victim = next(p for p in cluster.local_processes if p.name == name)
                os.kill(victim.pid, signal.SIGKILL)
                print(f"killed {name} (layers {first}..{last})")
        print("identical to the fault-free run:", "".join(pieces) == reference)
        print("layers now:", cluster.layer_map())
        print("stats:", cluster.stats())
