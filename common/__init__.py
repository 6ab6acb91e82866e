"""Code that the server and the training package must share so that online and offline agree.

`text` (the lexical tokenizer), `encoding` (the transformer text encoder and device policy) and
`bundle_format` (manifest schema, file names, checksums). Nothing here imports server or training.
"""
