"""One module per `mechsieve` command (NAME, HELP, add_arguments, run); `cli.py` finds them."""
