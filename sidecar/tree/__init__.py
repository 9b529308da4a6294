"""The project directory: safe paths, file writes and the state store that records them.

Everything that writes into ``PROJECT_DIR`` goes through these modules.
"""
