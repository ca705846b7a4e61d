"""The bundled demo corpus (tinyshakespeare.txt.gz; see PROVENANCE.md).

Shakespeare's works as collected in Karpathy's char-rnn repository: public domain.
"""
