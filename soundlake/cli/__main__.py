from soundlake.cli.app import app

app()
