/* Placeholder: the keyed-mutex core lands here (C11 atomics + futex). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_futex", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__futex(void) { return PyModule_Create(&mod); }
