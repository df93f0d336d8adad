"""`soundlake serve`: browse, listen to and review the lake in a web browser."""
from __future__ import annotations

import getpass
import socket
from typing import Optional

import typer

from soundlake.cli.main import LAKE, LAKE_PANEL, app, console


@app.command(rich_help_panel=LAKE_PANEL)
def serve(
    lake: str = LAKE,
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback needs a token."),
    port: int = typer.Option(8765, min=1, max=65535, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, envvar="SOUNDLAKE_SERVE_TOKEN",
                                        help="Require this token from every client (made up and printed when "
                                             "--host is not loopback). Also read from $SOUNDLAKE_SERVE_TOKEN."),
    review: bool = typer.Option(False, "--review", help="Accept reviews (flag captions, exclude clips): each is "
                                "a row of the lake's reviews table. Without it the server only reads."),
    reviewer: Optional[str] = typer.Option(None, help="Name recorded with each review (default: your user name)."),
    clap: Optional[str] = typer.Option(None, help="CLAP model folder for the text→audio similarity box (the "
                                       "model that wrote the lake's embeddings); without it the box is off."),
    query_timeout: float = typer.Option(5.0, min=0.1, help="Seconds a query may run before it is interrupted."),
):
    """Serve the lake as web pages: a clip list with filters, text similarity and an SQL WHERE
    box, a page per clip (player, spectrogram, every caption and score, tags, metadata, runs,
    exports) and dashboards. Read-only unless --review.

    Listens on http://127.0.0.1:8765 by default. With --host beyond loopback every request
    needs the token: open the printed login link (it sets a cookie) or send
    `Authorization: Bearer TOKEN`. SQL goes through the read-only layer with a time limit.
    Keys: space play/pause, j/k next/previous, g/p/w caption good/partly wrong/wrong,
    x exclude clip, u undo, enter open clip, ? all keys."""
    from soundlake.serve import app as web
    from soundlake.serve.auth import is_loopback, new_token

    if token is None and not is_loopback(host):
        token = new_token()
    load_model = None
    if clap:
        from soundlake.cli.catalog import load_clap as load_model
    if review:
        reviewer = reviewer or getpass.getuser()
    asgi = web.create_app(lake, host=host, token=token, review=review, reviewer=reviewer,
                          load_model=load_model, clap_model=clap, limit_s=query_timeout)
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{port}/"
    clips = asgi.catalog.current().facets["clips"]
    console.print(f"soundlake serve: {clips} clips of {lake}, "
                  + (f"[bold]reviews on[/] as {reviewer}" if review else "read-only"), highlight=False, soft_wrap=True)
    if asgi.catalog.text_search:
        console.print(f"text search off: {asgi.catalog.text_search}", highlight=False, soft_wrap=True)
    console.print(f"open {url}login?token={token}" if token else f"open {url}", highlight=False, soft_wrap=True)
    web.serve(asgi, host, port)
