# Ferry minivm guest program (64-bit long mode, CPL 3, no stack, no IDT).
# Assembled with `as --64 program.S -o /tmp/p.o && objdump -d /tmp/p.o`;
# the bytes are embedded in src/guest.rs. Register contract (set by the host):
#   rdi = base GPA of this vCPU's share of the data region
#   rsi = pages (working-set: this vCPU's W pages; sweep/random: share pages)
#   r12 = GPA of this vCPU's counter (u64)
#   sweep:  r8 = TSC ticks per page, r10 = max lag in ticks
#   random: r8 = xorshift64 state, r9 = hot pages, r10 = hot threshold (0..=256)
    .intel_syntax noprefix
    .code64
idle:
    inc qword ptr [r12]
    out 0x80, al
    jmp idle
ws:
    mov rax, [r12]
ws_round:
    inc rax
    mov rcx, rsi
    mov rbx, rdi
ws_page:
    mov [rbx], rax
    add rbx, 0x1000
    dec rcx
    jnz ws_page
    mov [r12], rax
    jmp ws_round
sweep:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r9, rax
    xor ebx, ebx
sweep_loop:
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, r9
    jae sweep_due
    out 0x81, al
    jmp sweep_loop
sweep_due:
    mov rcx, rax
    sub rcx, r9
    cmp rcx, r10
    jbe sweep_write
    mov r9, rax
sweep_write:
    mov rax, rbx
    shl rax, 12
    add rax, rdi
    mov rcx, [r12]
    inc rcx
    mov [rax], rcx
    mov [r12], rcx
    add r9, r8
    inc rbx
    cmp rbx, rsi
    jb sweep_loop
    xor ebx, ebx
    jmp sweep_loop
random:
    mov rax, r8
    shl rax, 13
    xor r8, rax
    mov rax, r8
    shr rax, 7
    xor r8, rax
    mov rax, r8
    shl rax, 17
    xor r8, rax
    mov rax, r8
    movzx ecx, al
    shr rax, 8
    xor edx, edx
    cmp rcx, r10
    jb random_hot
    div rsi
    jmp random_write
random_hot:
    div r9
random_write:
    shl rdx, 12
    add rdx, rdi
    inc r13
    mov [rdx], r13
    test r13d, 0xfff
    jnz random
    inc qword ptr [r12]
    jmp random
