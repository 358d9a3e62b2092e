"""`fmnist sweep`: many training runs compared, on Optuna.

    plan.py     what a sweep varies: lists (a grid) or ranges (a search), each value checked up front
    study.py    where the study is kept (a journal file, or a database), and the one file that touches
                Optuna's private API
    workers.py  who runs the trials: each worker takes one at a time and trains it as an ordinary run
    results.py  what they found: the table, results.csv, the best run and its command

Each trial is an ordinary `fmnist train` run in its own folder, so it can be evaluated, exported or resumed like
any other run.
"""
