"""Write the ``nextline`` task (built from the offline corpora) as a local lm-eval task folder.

    python scripts/harness_local_task.py --out runs/harness-tasks --examples 40 --context 384
    sattn eval --methods full,stochastic+sinks=4+local=0.5 --windows 64 --seeds 0 \\
        --tasks nextline --examples 40 --context 384 \\
        --harness sattn_nextline --harness-include runs/harness-tasks
"""

import argparse

from stochastic_attention.data.corpora import load_corpus
from stochastic_attention.eval.harness import write_choice_task
from stochastic_attention.eval.tasks import nextline_task
from stochastic_attention.models import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer builds the task")
    p.add_argument("--corpora", default="shakespeare,bible,wikipedia")
    p.add_argument("--examples", type=int, default=40)
    p.add_argument("--context", type=int, default=384)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--out", default="runs/harness-tasks")
    args = p.parse_args()
    _, tokenizer = load_pretrained(args.model)
    docs = [d for c in args.corpora.split(",") for d in load_corpus(c.strip())]
    task = nextline_task(tokenizer, docs, count=args.examples, context=args.context,
                         seed=args.data_seed)
    print(f"wrote {write_choice_task(task, tokenizer, args.out)} ({len(task.examples)} items)")


if __name__ == "__main__":
    main()
