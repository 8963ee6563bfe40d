"""Audio-text records, readers and writers, tasks and label sets, and the synthetic chorus.

    >>> from corpus.tasks import TASKS
    >>> sorted(TASKS)
    ['calltype', 'count', 'detection', 'lifestage', 'species']
"""
