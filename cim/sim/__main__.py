"""
C{python -m cim.sim}: run the cluster simulator over seeds (L{cim.sim.cli}).
"""

from cim.sim.cli import main

raise SystemExit(main())
