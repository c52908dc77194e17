"""How a query scores a label: the scoring vectors and exact top-k over them (scoring/rows.py), and the kNN votes
of the training queries that re-rank the top candidates (scoring/neighbour_votes.py)."""
