"""pacemaker (python-ace): its file contract, one attempt of a fit, its environment on a node."""
