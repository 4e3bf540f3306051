"""BAdam's gap to AdamW on the convergence benchmark's tasks, ablated over seeds.

On ``roberta-pretrained`` (the default; ``llama-pretrained`` and the random-init tasks with
``--tasks``) BAdam's held-out loss trails AdamW's in the convergence benchmark. Each row changes one
thing about the benchmark's BAdam run, the others staying at the benchmark's setting (its options,
pretrained model, seeds and the learning rates its sweep chose on a validation split,
``benchmarks/results/convergence_sweep.json``; a rate multiple is of that rate):

* what BAdam trains: the task head as one more block instead of always active (the behaviour before
  always-active leaves), the head's Adam moments kept across block switches instead of reset with
  the block's (the reference resets them), the embedding always active too (then BAdam trains the
  parameters AdamW trains, one layer at a time);
* how many steps each layer gets: 5 and 1 block-epochs instead of 2 (``switch_every`` 10 and 50
  at 200 steps over 4 layers), 2x and 4x the steps at 2 block-epochs (``switch_every`` scaled);
* the learning rate: 0.3x and 3x the chosen one;
* the strength of the pretraining: 4x the pretraining steps (its own pretrained model, cached once
  by the examples; the expensive row).

Reference rows: AdamW on every parameter and on BAdam's trainable set (``adamw_layers``) at the
benchmark's setting, at 2x and 4x the steps and after the stronger pretraining; each BAdam row's
held-out loss is divided by the matching AdamW row's (same seed). The learning rates were swept at
the benchmark's 200 steps and are kept for the longer runs.

    python -m benchmarks.badam_ablation                  # roberta-pretrained, seeds 0 1 2
    python -m benchmarks.badam_ablation --variants adamw "benchmark setting" "lr x3"
    python -m benchmarks.badam_ablation --tasks llama-pretrained
    python -m benchmarks.badam_ablation --quick          # 2-layer model, 20 steps, seed 0
    python -m benchmarks.badam_ablation --reuse benchmarks/results/badam_ablation.json
                                                         # continue a stopped run

(``python -m benchmarks.ablation --study badam`` runs the same study.)
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import ablation, convergence

V = ablation.Variant
ROBERTA = ("roberta", "roberta-pretrained")
LLAMA = ("llama", "llama-pretrained")

VARIANTS = {
    "adamw": V("adamw"),
    "adamw_layers": V("adamw_layers", reference="adamw"),
    "benchmark setting": V("badam", reference="adamw"),
    "head not always active (a block of its own)": V(
        "badam", ("--no-always-active-head",), reference="adamw", tasks=ROBERTA),
    "head moments kept across switches": V(
        "badam", ("--no-reset-always-active",), reference="adamw", tasks=ROBERTA),
    "embedding always active too": V(
        "badam", ("--always-active", "embeddings"), reference="adamw", tasks=ROBERTA),
    "embedding, LM head and final norm always active": V(
        "badam", ("--always-active", "embed_tokens,lm_head,^norm"), reference="adamw", tasks=LLAMA),
    "5 block-epochs": V("badam", block_epochs=5, reference="adamw"),
    "1 block-epoch": V("badam", block_epochs=1, reference="adamw"),
    "lr x0.3": V("badam", lr_factor=0.3, reference="adamw"),
    "lr x3": V("badam", lr_factor=3.0, reference="adamw"),
    "2x steps": V("badam", steps_factor=2, reference="adamw, 2x steps"),
    "adamw, 2x steps": V("adamw", steps_factor=2),
    "4x steps": V("badam", steps_factor=4, reference="adamw, 4x steps"),
    "adamw, 4x steps": V("adamw", steps_factor=4),
    "adamw_layers, 4x steps": V("adamw_layers", steps_factor=4, reference="adamw, 4x steps"),
    "stronger pretraining (4x steps)": V("badam", pretrain_factor=4,
                                         reference="adamw, stronger pretraining (4x steps)"),
    "adamw, stronger pretraining (4x steps)": V("adamw", pretrain_factor=4),
}


def header(t: dict, result: dict) -> str:
  base = next((r for r in t["rows"] if r["variant"] == "benchmark setting"), None)
  rates = "; ".join(f"{opt} {lr['lr']:g} ({lr['source']})"
                    for opt, lr in (t.get("learning_rates") or {}).items())
  pre = (f", pretrained for {base['pretrain_steps']} AdamW steps (examples' seed "
         f"{result['model_seed']})" if base and base.get("pretrain_steps") else "")
  blocks = (f", {base['blocks']} BAdam blocks" if base and base.get("blocks") else "")
  return (f"*{t['task']}*: seeds {', '.join(map(str, result['seeds']))} (mean ± std){pre}"
          f"{blocks}; learning rates {rates}; the benchmark setting's options "
          f"`{' '.join(t.get('options', []))}`; switch_every (block-epochs) per row:")


STUDY = ablation.Study(
    name="badam_ablation", description=__doc__, variants=VARIANTS,
    tasks=("roberta-pretrained",), seeds=(0, 1, 2), swept_rates=True,
    model_seed=convergence.MODEL_SEED,
    settings=True, header=header, note=(
        "Each BAdam row changes one thing about the convergence benchmark's BAdam run (its "
        "options, pretrained model, seeds and swept learning rates): the task head as a block of "
        "its own instead of always active, the head's Adam moments kept across switches "
        "(`--no-reset-always-active`; the reference resets them), the embedding always active "
        "too, 5 or 1 block-epochs instead of 2, 0.3x or 3x the chosen rate, 2x or 4x the steps at "
        "2 block-epochs, or 4x the pretraining steps. The last column divides its held-out loss "
        "by the matching AdamW row's (same seed); the rates were swept at 200 steps and are kept "
        "for the longer runs."))


def main(argv: Sequence[str] | None = None) -> dict:
  return ablation.run(STUDY, argv, "python -m benchmarks.badam_ablation")


if __name__ == "__main__":
  main()
