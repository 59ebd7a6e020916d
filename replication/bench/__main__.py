"""`python -m replication.bench ...`: see replication/bench/cli.py."""
import sys

from replication.bench.cli import main

sys.exit(main())
