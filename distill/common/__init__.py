"""Foundations every other part uses: errors and their one-line messages, atomic file writes, output
locks, what the machine is (``hardware``) and where the offline assets live (``assets``). Imports nothing
above it.
"""
