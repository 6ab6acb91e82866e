"""Offline pipeline: turns a catalog (and later behaviour logs and judgments) into an artifact bundle.

`catalog` reads and validates catalogs, `bundle_writer` writes a verified bundle atomically,
`__main__` is the CLI (`python -m training build ...`). The server never imports this package.
"""
