#pragma once  // tools/simt: shim.h (force-included) defines what is needed
