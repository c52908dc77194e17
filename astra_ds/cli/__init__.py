"""The `astra-ds` command line: main.py assembles the parser and turns errors into exit codes; each other module
is one group of commands, which parses its arguments, refuses mistakes in one line before the libraries load,
and calls the library."""
