from pkdq.cli import app

app(prog_name="pkdq")
