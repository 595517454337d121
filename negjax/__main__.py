from negjax.cli import entry

entry()
