"""`soundlake serve`: a web browser over the lake (list, clip page, dashboards, reviews).

* :mod:`~soundlake.serve.queries`: what the pages read, precomputed once per lake state into an
  in-memory DuckDB table; every statement goes through the read-only SQL layer with a time limit.
* :mod:`~soundlake.serve.reviews`: review rows (``--review``), appended to the lake's ``reviews`` table.
* :mod:`~soundlake.serve.auth`: the token, ``Host`` and ``Origin`` checks in front of every request.
* :mod:`~soundlake.serve.app`: the Starlette app and its routes; ``static/`` holds the page.
"""
