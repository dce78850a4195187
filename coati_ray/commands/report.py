"""Draw a run's curves: `coati report RUN_DIR` writes RUN_DIR/report.png and report.html.

    coati report outputs/ppo          # a --save_path of coati sft / rm / dpo / ppo
    coati report outputs/demo         # a demo's --out: every stage, and the gold score before and after

What is drawn: coati_ray/report.py.
"""

import sys
from dataclasses import dataclass

from coati_ray.cli import parse, run_main, setup_logging
from coati_ray.config import _help
from coati_ray.errors import ConfigError


@dataclass
class ReportArgs:
    """How the picture is drawn (the run directory is the positional argument)."""

    dpi: int = _help("Resolution of report.png: dots per inch of its 4.2 x 3.2 inch panels.", default=100)

    def validate(self) -> None:
        if not 20 <= self.dpi <= 600:
            raise ConfigError("dpi", f"must be in [20, 600], got {self.dpi}")


def main(argv=None) -> tuple:
    setup_logging()
    (args,), extra = parse([ReportArgs], argv, "Plot a coati_ray run's curves into RUN_DIR/report.png and report.html.",
                     positional=[("run_dir", "a run's --save_path, or a demo's --out")])
    args.validate()
    if not extra.run_dir:
        raise ConfigError("run_dir", "give the run directory: coati report RUN_DIR")
    from coati_ray.report import write_report

    png, page = write_report(extra.run_dir, dpi=args.dpi)
    print(f"report: {png} and {page}")
    return png, page


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
