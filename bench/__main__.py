from bench.cli import entry, main

entry(main)
