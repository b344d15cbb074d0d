"""The process around a verb: the Ray session, the console and its log, Ray Jobs submission."""
