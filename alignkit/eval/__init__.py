"""Evaluation components: tasks (MMLU, GSM8K, AlpacaEval, SimpleSafetyTests, over-refusal) with their
parsers and graders, an LLM judge, metrics (pass@k, intervals), a Bradley-Terry leaderboard, the runner
(:func:`alignkit.eval.runner.run_eval`), report writers and lm-eval tasks. ``alignkit eval`` is the CLI
(:mod:`alignkit.cli.eval`). Import the submodules directly; this package re-exports nothing, so that
importing one of them stays cheap and the import graph stays visible.
"""
