import sys

try:
    from bench.cli import main

    code = main()
except KeyboardInterrupt:  # outside a command's own handling (its imports, its last printing)
    print("\ninterrupted", file=sys.stderr)
    code = 130
sys.exit(code)
