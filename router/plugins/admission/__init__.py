"""Admission plugins: may a request be dispatched now, queued, or shed?"""
