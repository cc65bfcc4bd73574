from mlxserve.cli import app

app(prog_name="mlxserve")
