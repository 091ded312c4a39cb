"""lm-evaluation-harness model `planner-lm`: a finished joint run, scored with its planner in the loop.

    planner-lm-eval --model planner-lm --model_args run=runs/demo/4_joint-soft --tasks wikitext --device cpu

Offline, score the run's own test documents as a local task (`task` writes it):

    planner-lm-eval task runs/demo
    planner-lm-eval --model planner-lm --model_args run=runs/demo/4_joint-soft \\
        --tasks planner_lm_text --include_path runs/demo/harness --device cpu

`planner-lm-eval` (also `python -m planner_lm.harness`) is the harness's own command line (every
`lm_eval` option works) with this model registered first: lm-eval 0.4.x finds models by import,
not by installed plugin, so a plain `lm_eval` does not see it (releases with entry-point discovery
will, through the `lm_eval.models` entry point in pyproject.toml). From Python, pass a
`PlannerHarnessLM` (or, after `import planner_lm.harness`, `model="planner-lm"`) to
`lm_eval.simple_evaluate`. Needs the optional extra `harness` (`pip install -e '.[harness]'`).

Loglikelihood and rolling loglikelihood (perplexity tasks) condition every token as training does,
with actions the planner picks from the text before each sentence (`planner_lm.planned_scoring`);
`generate_until` writes with the planner re-planning at every sentence end.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from planner_lm.artifacts import atomic_write_text
from planner_lm.errors import UserError
from planner_lm.ownership import check_owned_folder, mark, marker_of

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the optional extra is missing: one clear line, not a traceback
    raise UserError("lm-evaluation-harness is not installed; run `pip install -e '.[harness]'` "
                    "(or `pip install lm-eval`)") from err

from planner_lm.planned_scoring import PlannedLM
from planner_lm.run_folder import RunFolder


@register_model("planner-lm")
class PlannerHarnessLM(LM):
    """The harness's `LM` interface over `PlannedLM` (one request at a time).

    Args (`--model_args`): run (joint-run directory), device (`auto`), max_length (tokens of
    context; default the LM's), batch_size (accepted for the harness's command line; unused).
    """

    def __init__(self, run: str, device: str = "auto", max_length: int | None = None,
                 batch_size: int | str = 1, **_: Any) -> None:
        super().__init__()
        self.model = PlannedLM(run, device=device, max_length=int(max_length) if max_length else None)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "PlannerHarnessLM":
        """From `--model_args` as a dict (the harness's CLI parses them so); `--device` wins if given."""
        if "run" not in arg_dict:
            raise UserError("planner-lm needs --model_args run=<run dir>/4_joint-<selection>")
        extra = {k: v for k, v in (additional_config or {}).items() if k == "device" and v is not None}
        return cls(**{**arg_dict, **extra})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "PlannerHarnessLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self.model.loglikelihood(*request.args) for request in tqdm(requests, disable=disable_tqdm)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        return [self.model.rolling_loglikelihood(request.args[0]) for request in tqdm(requests, disable=disable_tqdm)]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm):
            context, settings = request.args
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0
            out.append(self.model.generate(context, until, int(settings.get("max_gen_toks", 128)), temperature))
        return out


TEXT_TASK = "planner_lm_text"
TEXT_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_text_task(texts: list[str], out_dir: str | Path, task: str = TEXT_TASK) -> Path:
    """A local wikitext-style perplexity task over `texts` (one document each), for `--include_path`.

    `out_dir` must be new, empty or an earlier task folder (its marker lists the task's files); only
    the task's two files are replaced, and a file of the user's in their place is refused, so the
    user's other files there stay theirs (and `make clean` sees them)."""
    out_dir = Path(out_dir)
    data = out_dir / f"{task}.jsonl"
    names = [data.name, f"{task}.yaml"]
    check_owned_folder(out_dir, "harness", "the task folder", names)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data, "".join(json.dumps({"text": text}) + "\n" for text in texts))
    atomic_write_text(out_dir / names[1], TEXT_TASK_YAML.format(task=task, data=data.resolve()))
    earlier = [f for f in marker_of(out_dir).get("files", []) if (out_dir / f).is_file()]
    mark(out_dir, "harness", files=sorted({*earlier, *names}))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """The harness's command line with `planner-lm` registered; `task RUN_DIR [OUT]` instead writes
    a local perplexity task over the run's test documents (default OUT: RUN_DIR/harness)."""
    from lm_eval.__main__ import cli_evaluate

    from planner_lm.errors import friendly_errors

    argv = sys.argv[1:] if argv is None else list(argv)
    with friendly_errors():
        if argv[:1] == ["task"]:
            if len(argv) not in (2, 3):
                raise UserError("usage: planner-lm-eval task RUN_DIR [OUT_DIR]")
            folder = RunFolder(argv[1])
            out = write_text_task(folder.prepared.split("test")["text"], argv[2] if len(argv) == 3
                                  else folder.root / "harness")
            print(f"wrote the task {TEXT_TASK} over {folder.root}'s test documents: --include_path {out}")
            return
        saved, sys.argv = sys.argv, [sys.argv[0], *argv]  # the harness's CLI reads sys.argv
        try:
            cli_evaluate()
        finally:
            sys.argv = saved


if __name__ == "__main__":
    main()
