"""`lenpred bench schedule-real`: router policies on real SGLang replicas (cli.py has the story)."""
