"""ASMK* (Tolias, Avrithis and Jégou, ICCV 2013), one module per concept, as jenicek/asmk computes it."""
