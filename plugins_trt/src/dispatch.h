// Calls fn.template run<B, PLAIN>() for a validated desc's grid: one instantiation per packing.
#ifndef BF_DISPATCH_H
#define BF_DISPATCH_H

#include "bf_decode.h"

namespace bf {

template <bool PLAIN, typename Fn>
int32_t dispatch_bits(int bits, Fn& fn) {
  switch (bits) {
    case 1: return fn.template run<1, PLAIN>();
    case 2: return fn.template run<2, PLAIN>();
    case 3: return fn.template run<3, PLAIN>();
    case 4: return fn.template run<4, PLAIN>();
    case 5: return fn.template run<5, PLAIN>();
    case 6: return fn.template run<6, PLAIN>();
    case 7: return fn.template run<7, PLAIN>();
    case 8: return fn.template run<8, PLAIN>();
    default: return BF_ERR_BITS;
  }
}

template <typename Fn>
int32_t dispatch(const bf_decode_desc& d, Fn& fn) {
  return d.grid == BF_GRID_PLAIN ? dispatch_bits<true>(d.bits, fn) : dispatch_bits<false>(d.bits, fn);
}

}  // namespace bf

#endif  // BF_DISPATCH_H
