"""Command-line commands over the library's methods (``interp attack``, ``interp attribute``); each
module registers its command with ``add_commands`` (the sparse dictionaries' own are ``interp.sae.cli``)."""
