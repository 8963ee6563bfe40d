"""The lean runtime: audio decoding, windowing, bundles, runners and writers.

Importing this package never imports torch or another package of this project; a field unit
installs only numpy, soundfile, soxr and onnxruntime.

    >>> from runtime.audio import read_audio
    >>> audio = read_audio("recording.wav", target_rate=16000)  # doctest: +SKIP
"""
