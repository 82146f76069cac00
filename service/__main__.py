"""`python -m service serve|worker`: the service's commands without the `qarvd` entry point
(how `qarvd serve` starts its embedded worker)."""

from service.cli import app

app(prog_name="python -m service")
