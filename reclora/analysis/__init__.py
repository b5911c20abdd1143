"""What finished runs say, each a command (`python -m reclora.analysis.NAME --help`):

  report           the comparison table of the runs in a folder (its results.csv)
  gates            are a gated run's gates personalized or collapsed (gates.json)
  study            a study folder summarized: bootstrap intervals, seeds, ablations, the Few2Many curve
  prompt_baseline  the AUC the prompt's ratings give without any model

They read runs of reclora.train and write nothing into them but gates.json.
"""
