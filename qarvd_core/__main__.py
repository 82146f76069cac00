from qarvd_core.cli import app

app(prog_name="qarvd")
