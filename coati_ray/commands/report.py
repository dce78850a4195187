"""Draw a run's curves: `coati report RUN_DIR` writes RUN_DIR/report.png and report.html.

    coati report outputs/ppo          # a --save_path of coati sft / rm / dpo / ppo
    coati report outputs/demo         # a demo's --out: every stage, and the gold score before and after

What is drawn: coati_ray/report.py.
"""

import sys
from dataclasses import dataclass

from coati_ray.cli import parse, run_main, setup_logging
from coati_ray.errors import ConfigError


@dataclass
class ReportArgs:
    """Nothing to set: the run directory is the positional argument."""


def main(argv=None) -> tuple:
    setup_logging()
    _, extra = parse([ReportArgs], argv, "Plot a coati_ray run's curves into RUN_DIR/report.png and report.html.",
                     positional=[("run_dir", "a run's --save_path, or a demo's --out")])
    if not extra.run_dir:
        raise ConfigError("run_dir", "give the run directory: coati report RUN_DIR")
    from coati_ray.report import write_report

    png, page = write_report(extra.run_dir)
    print(f"report: {png} and {page}")
    return png, page


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
